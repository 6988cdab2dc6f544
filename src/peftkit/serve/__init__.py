"""Serve one base model with many LoRA adapters over an OpenAI-compatible HTTP API.

Example:
    >>> from peftkit.serve import Engine, ServeSettings, create_app
    >>> engine = Engine.from_paths("smollm2-135m", {"outcome": "runs/outcome/adapter"}, ServeSettings(api_key="k"))
    >>> app = create_app(engine)              # uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from .app import create_app
from .decode import SamplingParams, Sequence
from .engine import Engine
from .settings import ServeSettings

__all__ = ["Engine", "SamplingParams", "Sequence", "ServeSettings", "create_app"]
