"""`peftkit ui`: check where to listen, build the app, run uvicorn.

Example:
    >>> run_ui(Path("runs"), Path("."), host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import uvicorn

from .app import UiSettings, create_app
from .errors import UiError
from .paths import Roots

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ui_settings(runs: Path, project: Path, host: str, api_key: str | None) -> UiSettings:
    """Settings for a UI on `host`; refuses a non-loopback bind without a key, and a runs path that is a file."""
    if not is_loopback(host) and not api_key:
        raise UiError(f"--host {host}: anyone who can reach this address could start runs; "
                      "pass --api-key KEY (or set PEFTKIT_UI_KEY) to listen beyond 127.0.0.1")
    if not project.is_dir():
        raise UiError(f"--project {project}: no such folder")
    if runs.exists() and not runs.is_dir():
        raise UiError(f"--runs {runs}: is a file, not a folder; give the folder that holds (or will hold) the runs")
    runs.mkdir(parents=True, exist_ok=True)
    return UiSettings(Roots(project.resolve(), runs.resolve()), api_key or None, loopback=is_loopback(host))


def run_ui(runs: Path, project: Path, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None) -> None:
    """Serve the UI until interrupted; runs it started keep going after it stops."""
    settings = ui_settings(runs, project, host, api_key)
    log.info("peftkit ui on http://%s:%d (runs: %s)", host, port, settings.roots.runs)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
