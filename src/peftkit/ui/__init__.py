"""A local web UI: start and watch runs, try adapters side by side, browse evaluation reports.

FastAPI (the stack `peftkit serve` uses) and one hand-written page with a little vanilla
JavaScript: no build step, nothing fetched at run time, charts drawn as SVG by the page itself.
Training, evaluation and generation run in child processes (`peftkit train`, `peftkit eval`,
`peftkit serve`), so the UI's own process holds no model and a run outlives a UI restart.

Example:
    $ peftkit ui --runs runs --port 7860
"""

from .app import UiSettings, create_app
from .paths import Roots
from .server import run_ui

__all__ = ["Roots", "UiSettings", "create_app", "run_ui"]
