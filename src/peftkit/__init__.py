"""peftkit: parameter-efficient fine-tuning of pretrained transformers, with the numbers to prove it.

Example:
    >>> from peftkit import attach, LoraConfig, AdaptedModel
    >>> adapted = attach(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    >>> print(adapted.trainable_report())
    >>> adapted.save_adapter("runs/x/adapter")
    >>> adapted, tokenizer = AdaptedModel.from_pretrained("runs/x/adapter")

The names below are imported on first use (PEP 562), so `import peftkit.config` or the web UI
does not load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdaptedModel": "adapters", "attach": "adapters", "format_trainable": "adapters",
    "LoraConfig": "config", "RunConfig": "config", "load_config": "config",
    "AdapterError": "errors", "ConfigError": "errors", "DataError": "errors", "ModelError": "errors",
    "PeftkitError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
