"""Method registry: a new method is a new file plus one line in `METHODS`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from . import adaption_prompt, bottleneck, lora, prefix_tuning, prompt_tuning, selective
from .base import AdapterLayer, AdapterLayerMixin, Method


def _attach_lora(model: nn.Module, name: str, config: lora.LoraConfig) -> list[str]:
    from ..inject import match_modules, match_targets, wrap_module

    saved = match_modules(model, config.modules_to_save) if config.modules_to_save else []
    paths = [p for p in match_targets(model, config.target_modules) if p not in saved]  # a saved module trains whole
    for path in paths:
        wrap_module(model, path, lora.LoraLinear).add_adapter(name, config)
    for path in saved:
        wrap_module(model, path, lora.ModulesToSave).add_adapter(name)
    return paths


METHODS: dict[str, Method] = {
    "lora": Method(
        "lora", lora.LoraConfig, _attach_lora, lora.to_peft_config, lora.from_peft_config, "LORA", None,
        lora.to_file_state, lora.from_file_state,
    ),
    "prompt_tuning": Method(
        "prompt_tuning", prompt_tuning.PromptTuningConfig, prompt_tuning.attach, prompt_tuning.to_peft_config,
        prompt_tuning.from_peft_config, "PROMPT_TUNING", prompt_tuning.model_keys, prompt_tuning.to_file_state,
        prompt_tuning.from_file_state,
    ),
    "prefix_tuning": Method(
        "prefix_tuning", prefix_tuning.PrefixTuningConfig, prefix_tuning.attach, prefix_tuning.to_peft_config,
        prefix_tuning.from_peft_config, "PREFIX_TUNING", prefix_tuning.model_keys, prompt_tuning.to_file_state,
        prompt_tuning.from_file_state,
    ),
    "adaption_prompt": Method(
        "adaption_prompt", adaption_prompt.AdaptionPromptConfig, adaption_prompt.attach, adaption_prompt.to_peft_config,
        adaption_prompt.from_peft_config, "ADAPTION_PROMPT", adaption_prompt.model_keys,
    ),
    "bottleneck": Method(
        "bottleneck", bottleneck.BottleneckConfig, bottleneck.attach, bottleneck.to_peft_config,
        bottleneck.from_peft_config, bottleneck.PEFT_TYPE, bottleneck.model_keys,
    ),
    "selective": Method(
        "selective", selective.SelectiveConfig, selective.attach, selective.to_peft_config, selective.from_peft_config,
        selective.PEFT_TYPE, None, selective.to_file_state, selective.from_file_state,
    ),
}
PEFT_TYPES = {m.peft_type: m for m in METHODS.values()}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not available; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_for_config(config: Any) -> Method:
    for method in METHODS.values():
        if isinstance(config, method.config_cls):
            return method
    raise ConfigError(f"no method takes a config of type {type(config).__name__}")


__all__ = ["METHODS", "PEFT_TYPES", "AdapterLayer", "AdapterLayerMixin", "Method", "get_method", "method_for_config"]
