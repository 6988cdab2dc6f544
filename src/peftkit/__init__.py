"""peftkit: parameter-efficient fine-tuning of pretrained transformers, with the numbers to prove it.

Example:
    >>> from peftkit import attach, LoraConfig, AdaptedModel
    >>> adapted = attach(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    >>> print(adapted.trainable_report())
    >>> adapted.save_adapter("runs/x/adapter")
    >>> adapted, tokenizer = AdaptedModel.from_pretrained("runs/x/adapter")
"""

from .adapters import AdaptedModel, attach, format_trainable
from .config import LoraConfig, RunConfig, load_config
from .errors import AdapterError, ConfigError, DataError, ModelError, PeftkitError

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "AdapterError",
    "ConfigError",
    "DataError",
    "LoraConfig",
    "ModelError",
    "PeftkitError",
    "RunConfig",
    "attach",
    "format_trainable",
    "load_config",
]
