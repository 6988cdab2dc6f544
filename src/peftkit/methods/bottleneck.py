"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020): h + up(act(down(h))) on a sublayer's output.

The adapter wraps the output projection of a sublayer (attention: o_proj / c_proj / o; feed-forward:
down_proj / c_proj / wo), so it acts on that sublayer's output before the residual is added.
Houlsby places one after the attention and one after the feed-forward block of every layer;
Pfeiffer only after the feed-forward block. down: hidden -> hidden / reduction_factor, up: back;
`up` starts at zero, so a fresh adapter is exactly the base model. The activation makes it
non-linear: it cannot be merged into the weights.

HF PEFT has no bottleneck adapters. Files keep PEFT's folder layout: adapter_config.json with
`peft_type: PEFTKIT_BOTTLENECK` (PEFT refuses the unknown type instead of mis-loading it) and the
settings in a `peftkit` section; tensors named `base_model.model.<path>.adapter_down.weight` etc.

Example:
    >>> adapted = attach(model, BottleneckConfig(placement="pfeiffer", reduction_factor=16))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import Any, Literal

import torch
from torch import nn

from ..architectures import model_type, require_architecture
from ..errors import ConfigError
from ..inject import match_targets, wrap_module
from .base import AdapterLayerMixin, Capabilities, Method
from .lora import linear_shape


@dataclass
class BottleneckConfig:
    """Bottleneck adapters: h + up(act(down(h))) on a sublayer's output, the up-projection zero-initialised."""

    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby: after the attention and after the feed-forward block of every layer; pfeiffer: after the feed-forward only."""
    reduction_factor: int = 16
    """Bottleneck width = hidden size / reduction_factor."""
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Non-linearity between the down- and up-projection."""

PEFT_TYPE = "PEFTKIT_BOTTLENECK"
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module, AdapterLayerMixin):
    """A linear output projection (or Conv1D) with named bottleneck adapters applied to its output."""

    adapter_attrs = ("adapter_down", "adapter_up", "adapter_activation")
    merge_refusal = "a bottleneck adapter is non-linear (up(act(down(h)))); it cannot be folded into a weight"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = linear_shape(base_layer)[1]
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_activation = nn.ModuleDict()
        self._init_adapter_state()

    def add_adapter(self, name: str, config: BottleneckConfig) -> None:
        width = max(1, self.hidden_size // config.reduction_factor)
        device = self.base_layer.weight.device
        self.adapter_down[name] = nn.Linear(self.hidden_size, width, device=device)  # kaiming-uniform, as nn.Linear
        self.adapter_up[name] = nn.Linear(width, self.hidden_size, device=device)
        nn.init.zeros_(self.adapter_up[name].weight)
        nn.init.zeros_(self.adapter_up[name].bias)
        self.adapter_activation[name] = ACTIVATIONS[config.activation]()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (B, T, D)
        name = self.active_adapter
        if name is None:
            return out
        down = self.adapter_down[name]
        update = self.adapter_up[name](self.adapter_activation[name](down(out.to(down.weight.dtype))))
        return out + update.to(out.dtype)

    def extra_repr(self) -> str:
        widths = {n: d.out_features for n, d in self.adapter_down.items()}
        return f"hidden={self.hidden_size}, bottlenecks={widths}, active={self.active_adapter!r}"


def sublayer_targets(model: nn.Module, placement: str) -> list[str]:
    """Names (suffixes) of the output projections the placement adapts, from the architectures table."""
    arch = require_architecture(model, "bottleneck adapters' sublayer outputs", "use lora")
    if arch.attention_output is None or arch.mlp_output is None:
        raise ConfigError(f"the architectures table names no unambiguous sublayer outputs for model type "
                          f"{model_type(model)!r}; use lora")
    return [arch.attention_output, arch.mlp_output] if placement == "houlsby" else [arch.mlp_output]


def attach(model: nn.Module, name: str, config: BottleneckConfig) -> list[str]:
    paths = match_targets(model, sublayer_targets(model, config.placement))
    for path in paths:
        wrap_module(model, path, BottleneckAdapter).add_adapter(name, config)
    return paths


def to_peft_config(config: BottleneckConfig) -> dict[str, Any]:
    return {
        "peftkit": {
            "method": "bottleneck", "placement": config.placement, "reduction_factor": config.reduction_factor,
            "activation": config.activation,
        }
    }


def model_keys(model: nn.Module, config: BottleneckConfig) -> dict[str, Any]:
    """The adapted sublayer outputs, for readers of the file (placement decides them again on load)."""
    return {"peftkit": {**to_peft_config(config)["peftkit"], "sublayers": sublayer_targets(model, config.placement)}}


def from_peft_config(raw: dict[str, Any]) -> BottleneckConfig:
    section = raw.get("peftkit")
    if not isinstance(section, dict) or section.get("method") != "bottleneck":
        raise ValueError("a PEFTKIT_BOTTLENECK adapter needs a `peftkit` section with method: bottleneck")
    placement, activation = section.get("placement"), section.get("activation")
    if placement not in ("houlsby", "pfeiffer") or activation not in ACTIVATIONS:
        raise ValueError(f"placement {placement!r} / activation {activation!r} are not ones peftkit knows")
    return BottleneckConfig(placement=placement, reduction_factor=int(section.get("reduction_factor")), activation=activation)


def check(config: BottleneckConfig) -> list[str]:
    return [] if config.reduction_factor >= 1 else ["bottleneck.reduction_factor: must be at least 1 (typical: 8-64)"]


METHOD = Method(
    "bottleneck", "Houlsby / Pfeiffer adapters on the attention and feed-forward outputs",
    Capabilities(mergeable=False, packable=True),
    sections={"bottleneck": BottleneckConfig}, section="bottleneck", config_cls=BottleneckConfig,
    attach=attach, to_peft_config=to_peft_config, from_peft_config=from_peft_config, peft_type=PEFT_TYPE,
    model_keys=model_keys, check=check,
)
