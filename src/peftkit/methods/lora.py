"""LoRA: W x + (alpha / r) * B A dropout(x), beside a frozen nn.Linear or GPT-2 Conv1D.

Layout and names follow HF PEFT (`base_layer`, `lora_A[name]`, `lora_B[name]`) so adapter
files are interchangeable. A starts random, B at zero: a fresh adapter changes nothing.

DoRA (`use_dora`) splits the adapted weight into a learned magnitude m (one per output
feature, PEFT's `lora_magnitude_vector`) and a direction: W' = m * (W + s B A) / ||W + s B A||,
the norm taken per output row and detached from the graph (DoRA paper, section 4.3).
m starts at ||W||, so a fresh DoRA adapter changes nothing either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..architectures import architecture_of, model_type, unique
from ..errors import AdapterError, ConfigError
from ..inject import linear_layer_names, match_modules, match_targets, wrap_module
from .base import AdapterLayerMixin, Capabilities, Method
from .quant import CONV1D_SOURCE, dense_weight, is_quantized


@dataclass
class LoraConfig:
    """Low-rank adapters beside chosen linear layers: W x + (alpha / r) * B A dropout(x)."""

    r: int = 16
    """Rank of the update (trainable parameters per layer: r * (in + out))."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input path."""
    target_modules: list[str] | str | None = None
    """Module names (exact or suffix), a regex string, `all-linear`, or null for the architecture's q/v default."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained fully and saved with the adapter (e.g. a classification head `score`)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """Initialisation of A (B is always zero, so a fresh adapter changes nothing)."""
    use_dora: bool = False
    """DoRA: also learn a magnitude per output feature, m * (W + BA) / ||W + BA|| (PEFT's `use_dora`)."""

LORA_TYPES = (nn.Linear, Conv1D)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is stored (in, out))."""
    if isinstance(layer, Conv1D):
        fan_in, fan_out = layer.weight.shape
        return int(fan_in), int(fan_out)
    return int(layer.in_features), int(layer.out_features)


def lora_scaling(config: LoraConfig) -> float:
    return config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


class DoraMagnitude(nn.Module):
    """DoRA's magnitude vector, one per output feature (a module so its key is PEFT's `...lora_magnitude_vector.weight`)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(nn.Module, AdapterLayerMixin):
    """A linear layer (or Conv1D, or a bitsandbytes 4/8-bit linear) with named LoRA / DoRA adapters beside it."""

    adapter_attrs = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")
    can_merge = True
    fused = True
    """LoRA (not DoRA) runs as one autograd function (`_LoraDelta`); False: the plain module-by-module path."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Conv1D stores (in, out); so does the float layer a quantized former Conv1D dequantizes back to
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) or getattr(base_layer, CONV1D_SOURCE, False)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
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
        if config.use_dora:
            with torch.no_grad():
                magnitude = self.direction_norm(name, self.weight_out_in(dtype))
            self.lora_magnitude_vector[name] = DoraMagnitude(magnitude)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.scaling.pop(name, None)

    def weight_out_in(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The unmerged base weight as (out, in), dequantized if the base is 4/8-bit."""
        weight = self._weight_before_merge
        if weight is None:
            return dense_weight(self.base_layer).to(dtype)
        return (weight.T if self.fan_in_fan_out else weight).to(dtype)

    def lora_weight(self, name: str) -> torch.Tensor:
        """s * B A as (out, in), in the adapter's dtype."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def direction_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row (out,), detached: DoRA treats it as a constant in backward."""
        return torch.linalg.norm(weight + self.lora_weight(name).detach().to(weight.dtype), dim=1).detach()

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adds to the base weight, in its layout ((out, in), or (in, out) for Conv1D).

        LoRA: s B A. DoRA: m / ||W + s B A|| * (W + s B A) - W, with W the unmerged weight.
        """
        delta = self.lora_weight(name).float()
        if name in self.lora_magnitude_vector:
            weight = self.weight_out_in(torch.float32)
            adapted = weight + delta
            scale = self.lora_magnitude_vector[name].weight.float() / torch.linalg.norm(adapted, dim=1)
            delta = scale[:, None] * adapted - weight
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, name: str) -> None:
        if is_quantized(self.base_layer):
            raise AdapterError(
                "the base layer is quantized, so the adapter cannot be merged into it in place: that would re-quantize "
                "W + BA and round the update away; use peftkit.methods.quant.merge_dequantized to merge into a 16/32-bit copy"
            )
        super().merge(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return result
        lora_a = self.lora_A[name]
        if name not in self.lora_magnitude_vector and self.fused:
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
            delta = _LoraDelta.apply(x, lora_a.weight, self.lora_B[name].weight, self.scaling[name], p)
            return result + delta.to(result.dtype)
        x = x.to(lora_a.weight.dtype)
        dropped = self.lora_dropout[name](x)
        lora_out = self.lora_B[name](lora_a(dropped)) * self.scaling[name]  # (B, T, out)
        if name in self.lora_magnitude_vector:
            lora_out = self._dora_output(name, dropped, result, lora_out)
        return result + lora_out.to(result.dtype)

    def _dora_output(self, name: str, dropped: torch.Tensor, result: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
        """DoRA's addition to the base output: (m/||W + sBA|| - 1) W x + m/||W + sBA|| * sBA x (PEFT's formula)."""
        weight = self.weight_out_in(lora_out.dtype)
        scale = self.lora_magnitude_vector[name].weight / self.direction_norm(name, weight)  # (out,)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = self.bias
            base_out = (result - bias if bias is not None else result).to(lora_out.dtype)
        else:  # with active dropout, the magnitude rescales W applied to the dropped input, as in PEFT
            base_out = F.linear(dropped, weight)
        return (scale - 1) * base_out + scale * lora_out

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, active={self.active_adapter!r}"


class _LoraDelta(torch.autograd.Function):
    """s * B A dropout(x) as one autograd node that keeps only what its backward needs.

    The plain path keeps the dropped input (a float copy of x per adapted layer) and a scaled
    (tokens x out) temporary; this keeps x itself (often kept anyway: q, k and v share it), a
    1-byte dropout mask, and the rank-r projection h = dropout(x) A^T. The same random stream as
    nn.Dropout, so fused and plain runs draw the same masks.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, p: float) -> torch.Tensor:
        xa = x.to(a.dtype)
        mask = torch.empty_like(xa).bernoulli_(1 - p).bool() if p > 0 else None
        dropped = xa * mask / (1 - p) if mask is not None else xa
        h = dropped @ a.T  # (..., r)
        ctx.save_for_backward(x, mask, h, a, b)
        ctx.scale, ctx.p = scale, p
        return h @ (b * scale).T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mask, h, a, b = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        grad = grad.to(b.dtype)
        flat_grad, flat_h = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
        grad_b = (flat_grad.T @ flat_h) * scale if ctx.needs_input_grad[2] else None
        grad_h = grad @ (b * scale)  # (..., r)
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            dropped = x.to(a.dtype)
            if mask is not None:
                dropped = dropped * mask / (1 - p)
            grad_a = grad_h.reshape(-1, grad_h.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a
            if mask is not None:
                grad_x = grad_x * mask / (1 - p)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a, grad_b, None, None


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
    if config.use_dora:
        out["use_dora"] = True
    return out


MAGNITUDE_KEY = ".lora_magnitude_vector.weight"


def to_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's file names DoRA's magnitude `...lora_magnitude_vector` (no `.weight`, its pre-0.12 layout)."""
    return {k.removesuffix(".weight") if k.endswith(MAGNITUDE_KEY) else k: v for k, v in state.items()}


def from_file_state(state: dict[str, torch.Tensor], expected: list[str], config: Any) -> dict[str, torch.Tensor]:
    """Inverse of `to_file_state`; files that kept the `.weight` suffix load too."""
    return {k + ".weight" if k.endswith(MAGNITUDE_KEY[: -len(".weight")]) else k: v for k, v in state.items()}


def from_peft_config(raw: dict[str, Any]) -> LoraConfig:
    for key, why in (("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
        if raw.get(key):
            raise AdapterError(f"adapter_config.json uses {why} ({key}), which this peftkit version does not load")
    if raw.get("layers_to_transform") is not None:
        raise AdapterError("adapter_config.json sets layers_to_transform, which this peftkit version does not load")
    alpha = raw.get("lora_alpha", 8)
    if int(raw.get("r", 8)) < 1:
        raise AdapterError(f"adapter_config.json: r must be at least 1, got {raw.get('r')}; the file is damaged")
    return LoraConfig(
        r=int(raw.get("r", 8)),
        alpha=float(alpha),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=raw.get("target_modules"),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        modules_to_save=list(raw.get("modules_to_save") or []),
        init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "kaiming",
    )


def default_targets(model: nn.Module) -> list[str]:
    """The query and value projections (the LoRA paper's placement), from the architectures table."""
    arch = architecture_of(model)
    if arch is None:
        raise ConfigError(
            f"no default target_modules for model type {model_type(model)!r}; set lora.target_modules to some of: "
            f"{', '.join(linear_layer_names(model))} (or 'all-linear')"
        )
    return unique(arch.query, arch.value)


def attach(model: nn.Module, name: str, config: LoraConfig) -> list[str]:
    """Wrap the target linears in LoraLinear and the modules_to_save in ModulesToSave (via inject.py)."""
    saved = match_modules(model, config.modules_to_save) if config.modules_to_save else []
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    paths = [p for p in match_targets(model, targets) if p not in saved]  # a saved module trains whole
    for path in paths:
        wrap_module(model, path, LoraLinear).add_adapter(name, config)
    for path in saved:
        wrap_module(model, path, ModulesToSave).add_adapter(name)
    return paths


def check(config: LoraConfig) -> list[str]:
    checks = [
        (config.r >= 1, "lora.r: must be at least 1 (typical: 4-64)"),
        (config.alpha > 0, "lora.alpha: must be positive (typical: r or 2*r)"),
        (0 <= config.dropout < 1, "lora.dropout: must be in [0, 1)"),
    ]
    return [message for ok, message in checks if not ok]


METHOD = Method(
    "lora", "Low-rank adapters beside chosen linear layers (rsLoRA and DoRA through lora.*)",
    Capabilities(mergeable=True, packable=True, row_routable=True, quantizable_base=True, added_tokens=True),
    sections={"lora": LoraConfig}, section="lora", config_cls=LoraConfig, attach=attach, to_peft_config=to_peft_config,
    from_peft_config=from_peft_config, peft_type="LORA", to_file_state=to_file_state, from_file_state=from_file_state,
    check=check,
)
