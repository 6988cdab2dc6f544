"""The method registry: a new method is a new file in this folder that ends with a `METHOD = Method(...)`
entry, plus one name in `ENTRIES` below. The run-config schema (`method:` choices and sections), training
setup, adapter files, the memory estimator, serving and the contract tests all read `METHODS`.

Example:
    >>> METHODS["lora"].capabilities.row_routable
    True
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from . import adaption_prompt, bottleneck, full, ia3, lora, prefix_tuning, prompt_tuning, qlora, selective
from .base import Method

ENTRIES = (lora, qlora, prompt_tuning, prefix_tuning, adaption_prompt, bottleneck, selective, ia3, full)

METHODS: dict[str, Method] = {module.METHOD.name: module.METHOD for module in ENTRIES}

PEFT_TYPES: dict[str, Method] = {}
"""adapter_config.json's peft_type -> the method that reads it (QLoRA adapters are LoRA files)."""
for _method in METHODS.values():
    if _method.peft_type is not None:
        PEFT_TYPES.setdefault(_method.peft_type, _method)

SECTIONS: dict[str, type] = {name: cls for method in METHODS.values() for name, cls in method.sections.items()}
"""Run-config section name -> its dataclass, in registry order (`lora`, `quant`, `prompt_tuning`, ...)."""


def get_method(name: str) -> Method:
    """The registry entry for `name`, or a ConfigError listing the methods there are."""
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not available; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_for_config(config: Any) -> Method:
    """The method an adapter config belongs to (the first entry with its class: LoRA before QLoRA)."""
    for method in METHODS.values():
        if method.config_cls is not None and isinstance(config, method.config_cls):
            return method
    raise ConfigError(f"no method takes a config of type {type(config).__name__}")


def packable_methods() -> tuple[str, ...]:
    """Methods whose parameters act per token (packing and padding-free rows keep examples independent)."""
    return tuple(name for name, method in METHODS.items() if method.capabilities.packable)
