"""LoRA: W x + (alpha / r) * B A dropout(x), beside a frozen nn.Linear or GPT-2 Conv1D.

Layout and names follow HF PEFT (`base_layer`, `lora_A[name]`, `lora_B[name]`) so adapter
files are interchangeable. A starts random, B at zero: a fresh adapter changes nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoraConfig
from .base import AdapterLayerMixin

LORA_TYPES = (nn.Linear, Conv1D)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is stored (in, out))."""
    if isinstance(layer, Conv1D):
        fan_in, fan_out = layer.weight.shape
        return int(fan_in), int(fan_out)
    return int(layer.in_features), int(layer.out_features)


def lora_scaling(config: LoraConfig) -> float:
    return config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


class LoraLinear(nn.Module, AdapterLayerMixin):
    """A linear layer (or Conv1D) with named LoRA adapters beside it."""

    adapter_attrs = ("lora_A", "lora_B", "lora_dropout")
    can_merge = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._init_adapter_state()

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype
        lora_a = nn.Linear(self.in_features, config.r, bias=False, device=weight.device, dtype=dtype)
        lora_b = nn.Linear(config.r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        if config.init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1 / config.r)
        else:  # PEFT's default: kaiming-uniform with a=sqrt(5), as nn.Linear does
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = lora_scaling(config)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.scaling.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """B A * scaling, in the base weight's layout ((out, in), or (in, out) for Conv1D)."""
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return result
        lora_a = self.lora_A[name]
        h = lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))  # (B, T, r)
        return result + (self.lora_B[name](h) * self.scaling[name]).to(result.dtype)

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self.active_adapter!r}"


class ModulesToSave(nn.Module, AdapterLayerMixin):
    """A module trained fully for an adapter (e.g. a classification head): PEFT's ModulesToSaveWrapper."""

    adapter_attrs = ("modules_to_save",)

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._init_adapter_state()

    @property
    def base_layer(self) -> nn.Module:  # the protocol's name for the wrapped module
        return self.original_module

    def add_adapter(self, name: str, config: Any = None) -> None:
        import copy

        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


def to_peft_config(config: LoraConfig) -> dict[str, Any]:
    """PEFT's LoraConfig keys, only those every PEFT release since 0.6 accepts (plus opt-in flags when set)."""
    out: dict[str, Any] = {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": list(config.modules_to_save) or None,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if config.use_rslora:
        out["use_rslora"] = True
    return out


def from_peft_config(raw: dict[str, Any]) -> LoraConfig:
    from ..errors import AdapterError

    for key, why in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
        if raw.get(key):
            raise AdapterError(f"adapter_config.json uses {why} ({key}), which this peftkit version does not load")
    if raw.get("layers_to_transform") is not None:
        raise AdapterError("adapter_config.json sets layers_to_transform, which this peftkit version does not load")
    alpha = raw.get("lora_alpha", 8)
    return LoraConfig(
        r=int(raw.get("r", 8)),
        alpha=float(alpha),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=raw.get("target_modules"),
        use_rslora=bool(raw.get("use_rslora", False)),
        modules_to_save=list(raw.get("modules_to_save") or []),
        init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "kaiming",
    )
