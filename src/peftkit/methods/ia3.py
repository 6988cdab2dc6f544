"""IA3 (Liu et al., 2022): learned vectors that rescale the keys, the values and the feed-forward input.

Each target linear layer gets a vector l, initialised to ones (a fresh adapter is the base): an
attention projection's output becomes l * (W x + b) (l has one entry per output feature); a
feed-forward layer's input becomes l * x before W (one entry per input feature). Both fold into W
(rows or columns scaled), so IA3 merges. Same layout, keys and arithmetic as PEFT's IA3
(`...k_proj.ia3_l`, shape (out, 1), or (1, in) for feed-forward layers), so files load both ways.

Example:
    >>> adapted = attach(model, IA3Config())   # Llama: k_proj, v_proj, down_proj (feed-forward)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..architectures import architecture_of, model_type, unique
from ..errors import ConfigError
from ..inject import is_match, linear_layer_names, match_modules, match_targets, wrap_module
from .base import AdapterLayerMixin, Capabilities, Method
from .lora import ModulesToSave, linear_shape


@dataclass
class IA3Config:
    """IA3: per-feature scaling vectors on the key, value and feed-forward layers (PEFT's IA3Config)."""

    target_modules: list[str] | str | None = None
    """Layers to rescale (names, suffixes or a regex); null: the architecture's key, value and feed-forward output."""
    feedforward_modules: list[str] | str | None = None
    """Which targets scale their input (feed-forward) instead of their output; null: the feed-forward output
    projection of the architectures table. Must be among target_modules."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained fully and saved with the adapter (e.g. a classification head)."""


class IA3Linear(nn.Module, AdapterLayerMixin):
    """A linear layer (or GPT-2 Conv1D) whose output (or, feed-forward, input) is scaled per feature."""

    adapter_attrs = ("ia3_l",)
    can_merge = True

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = feedforward
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.ia3_l = nn.ParameterDict()
        self._bias_before_merge: torch.Tensor | None = None
        self._init_adapter_state()

    def add_adapter(self, name: str) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)  # PEFT's shapes
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=self.base_layer.weight.device))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[name].flatten()
        if self.is_feedforward:  # (B, T, in) * (in,)
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (B, T, out) * (out,)
        return (result.to(scale.dtype) * scale).to(result.dtype)

    def _weight_scale(self, name: str) -> torch.Tensor:
        """l shaped to multiply the stored weight ((out, in), or (in, out) for Conv1D)."""
        scale = self.ia3_l[name].detach().float()  # (out, 1) or (1, in)
        return scale.T if self.fan_in_fan_out else scale

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Scale W's rows (output side, and the bias) or columns (feed-forward input side) by l."""
        if name in self.merged_adapters:
            return
        if self.merged_adapters:
            raise ConfigError("another IA3 adapter is merged here; unmerge it first")
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        self._weight_before_merge = weight.data.clone()
        weight.data = (weight.data.float() * self._weight_scale(name)).to(weight.dtype)
        if bias is not None and not self.is_feedforward:
            self._bias_before_merge = bias.data.clone()
            bias.data = (bias.data.float() * self.ia3_l[name].detach().float().flatten()).to(bias.dtype)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._bias_before_merge is not None:
            self.base_layer.bias.data = self._bias_before_merge
            self._bias_before_merge = None
        super().unmerge()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, feedforward={self.is_feedforward}, active={self.active_adapter!r}"


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets) from the architectures table: key, value, feed-forward output projection."""
    arch = architecture_of(model)
    if arch is None or arch.mlp_output is None:
        raise ConfigError(
            f"no default IA3 targets for model type {model_type(model)!r}; set ia3.target_modules and "
            f"ia3.feedforward_modules to some of: {', '.join(linear_layer_names(model))}"
        )
    return unique(arch.key, arch.value, arch.mlp_output), [arch.mlp_output]


def attach(model: nn.Module, name: str, config: IA3Config) -> list[str]:
    """Wrap each target linear in IA3Linear (feed-forward ones scale their input), via inject.py."""
    targets, feedforward = config.target_modules, config.feedforward_modules
    if targets is None:
        targets, default_ff = default_targets(model)
        feedforward = default_ff if feedforward is None else feedforward
    saved = match_modules(model, config.modules_to_save) if config.modules_to_save else []
    paths = [p for p in match_targets(model, targets) if p not in saved]
    ff_paths = {p for p in paths if feedforward and is_match(p, feedforward)}
    if feedforward and not ff_paths:
        raise ConfigError(f"ia3.feedforward_modules {feedforward!r} matched none of the target modules; "
                          "feed-forward modules must be among ia3.target_modules")
    for path in paths:
        wrap_module(model, path, lambda layer, ff=path in ff_paths: IA3Linear(layer, ff)).add_adapter(name)
    for path in saved:
        wrap_module(model, path, ModulesToSave).add_adapter(name)
    return paths


def to_peft_config(config: IA3Config) -> dict[str, Any]:
    """PEFT's IA3Config keys."""
    return {
        "target_modules": config.target_modules,
        "feedforward_modules": config.feedforward_modules,
        "fan_in_fan_out": False,
        "modules_to_save": list(config.modules_to_save) or None,
        "init_ia3_weights": True,
    }


def model_keys(model: nn.Module, config: IA3Config) -> dict[str, Any]:
    """The targets attach() resolved, so PEFT (which needs both lists) places the same vectors."""
    if config.target_modules is not None and config.feedforward_modules is not None:
        return {}
    targets, feedforward = default_targets(model)
    return {"target_modules": config.target_modules or targets, "feedforward_modules": config.feedforward_modules or feedforward}


def from_peft_config(raw: dict[str, Any]) -> IA3Config:
    return IA3Config(
        target_modules=raw.get("target_modules"), feedforward_modules=raw.get("feedforward_modules"),
        modules_to_save=list(raw.get("modules_to_save") or []),
    )


METHOD = Method(
    "ia3", "IA3: learned vectors rescaling keys, values and the feed-forward input (Liu et al.)",
    Capabilities(mergeable=True, packable=True, added_tokens=True),
    sections={"ia3": IA3Config}, section="ia3", config_cls=IA3Config, attach=attach, to_peft_config=to_peft_config,
    from_peft_config=from_peft_config, peft_type="IA3", model_keys=model_keys,
)
