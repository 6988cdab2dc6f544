"""`peftkit serve`: parse `--adapter name=PATH`, build the engine, run uvicorn.

Example:
    >>> run_server("smollm2-135m", parse_adapter_specs(["outcome=runs/outcome/adapter"]), ServeSettings())
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Sequence

from ..adapters import read_adapter_config, read_sidecar
from ..errors import AdapterError, ConfigError
from ..models import BUILTIN_MODELS
from .app import create_app
from .embeddings import EmbeddingService, create_embedding_app, is_embedding_adapter
from .engine import Engine
from .settings import ServeSettings

log = logging.getLogger(__name__)


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`["outcome=runs/a/adapter", ...]` -> {"outcome": Path(...)}; names must be unique identifiers."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=PATH, e.g. --adapter outcome=runs/outcome/adapter")
        if not name.isidentifier():
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} must be a Python identifier (letters, digits, _)")
        if name in adapters:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters[name] = Path(path)
    return adapters


def base_of(adapters: dict[str, Path]) -> str:
    """The base model recorded by the first adapter (what `--model` defaults to): its built-in name when
    peftkit trained it on one (so it is served as "smollm2-135m", not as a cache path), else the recorded path."""
    if not adapters:
        raise ConfigError("give --model NAME, or at least one --adapter NAME=PATH whose base is recorded")
    first = next(iter(adapters.values()))
    origin = read_sidecar(first).get("base_model")
    if isinstance(origin, dict) and origin.get("builtin") in BUILTIN_MODELS:
        return str(origin["builtin"])
    _, raw = read_adapter_config(first)
    if not raw.get("base_model_name_or_path"):
        raise AdapterError("the first adapter records no base model; pass --model")
    return str(raw["base_model_name_or_path"])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(
    model: str | None, adapters: dict[str, Path], settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
    merge: bool = False, device: str = "auto", precision: str = "auto", base_name: str | None = None,
) -> None:
    """Load everything, then serve until interrupted."""
    import uvicorn

    if not is_loopback(host) and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach the port can use it (set PEFTKIT_API_KEY)", host)
    if adapters and is_embedding_adapter(next(iter(adapters.values()))):  # an encoder's embedding adapters: /v1/embeddings
        service = EmbeddingService.from_paths(adapters, model, settings, device, precision, base_name)
        names, app = service.model_names(), create_embedding_app(service)
    else:
        engine = Engine.from_paths(model or base_of(adapters), adapters, settings, merge=merge, device=device,
                                   precision=precision, base_name=base_name)
        names, app = engine.model_names(), create_app(engine)
    log.info("serving %s on http://%s:%d/v1", ", ".join(names), host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=settings.drain_seconds)
