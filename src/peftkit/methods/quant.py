"""QLoRA's frozen base: linear layers stored in 4-bit NF4 (or 8-bit LLM.int8) by bitsandbytes.

`quantize_base` swaps each linear layer of the base (not the output head, not the model's own
fp32 modules such as T5's `wo`) for a bitsandbytes `Linear4bit` / `Linear8bitLt` holding the same
weights, through inject.py. LoRA then wraps those layers as it wraps any linear layer; the
adapter file is a plain LoRA file that PEFT loads onto a full-precision base.

Merging never re-quantizes: `merge_dequantized` dequantizes the base to 16/32-bit, merges there,
and reports how far the merged model is from the quantized one it was trained on.

Example:
    >>> report = quantize_base(model, QuantConfig(bits=4, quant_type="nf4", double_quant=True))
    >>> report.bytes_before, report.bytes_after      # weights in memory, before / after
    >>> adapted = attach(model, LoraConfig(r=8))
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError
from ..inject import is_match, replace_module
from ..precision import resolve_dtype
from .base import AdapterLayerMixin


@dataclass
class QuantConfig:
    """How `method: qlora` stores the frozen base's linear layers (bitsandbytes)."""

    bits: Literal[4, 8] = 4
    """4: NF4/FP4 blocks (QLoRA); 8: LLM.int8 (Linear8bitLt)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NF4 (normal-float, the QLoRA paper's) or FP4."""
    double_quant: bool = True
    """Quantize the per-block scales too (saves ~0.4 bits per weight)."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype of the matmuls: auto = bf16 where the device computes it natively, else fp32."""
    skip_modules: list[str] = field(default_factory=list)
    """Linear layers kept in full precision besides the output head and the model's own fp32 modules."""

log = logging.getLogger(__name__)

CONV1D_SOURCE = "peftkit_from_conv1d"  # attribute set on a quantized layer made from a GPT-2 Conv1D


@dataclass(frozen=True)
class QuantReport:
    """What `quantize_base` did: layer count and the model's weight bytes before and after."""

    layers: int
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        return (
            f"quantized {self.layers} linear layers: weights {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB ({self.bytes_before / max(1, self.bytes_after):.2f}x smaller)"
        )


@dataclass(frozen=True)
class MergeReport:
    """Max |logit difference| against the quantized model with its adapter, as saved and if re-quantized."""

    max_logit_error: float
    requantized_logit_error: float
    dtype: torch.dtype


def is_quantized(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (checked without importing bitsandbytes)."""
    return type(layer).__name__ in ("Linear4bit", "Linear8bitLt") and type(layer).__module__.startswith("bitsandbytes")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a float (out, in) matrix: dequantized for bitsandbytes, transposed for Conv1D."""
    if isinstance(layer, Conv1D):
        return layer.weight.T
    if not is_quantized(layer):
        return layer.weight
    import bitsandbytes as bnb

    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return bnb.functional.int8_vectorwise_dequant(weight.data, _int8_scales(layer)).float()


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    """Row scales of a Linear8bitLt: on the weight until the first forward moves them to `layer.state`."""
    scales = layer.weight.SCB
    return scales if scales is not None else layer.state.SCB


def compute_dtype(config: QuantConfig, device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (`auto`), else fp32; or the named dtype."""
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return named[config.compute_dtype] if config.compute_dtype in named else resolve_dtype("auto", device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers, counting bitsandbytes' block scales (quant_state) too."""
    total, seen = 0, set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
        total += _quant_state_bytes(getattr(tensor, "quant_state", None))
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt" and is_quantized(module):
            scales = _int8_scales(module)
            total += scales.numel() * scales.element_size()
    return total


def _quant_state_bytes(state: Any) -> int:
    if state is None:
        return 0
    tensors = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


BLOCK_SIZE = 64
"""bitsandbytes' 4-bit block along a weight row: its kernels read each row's scales as in_features / 64
blocks, so a layer whose input width is not a multiple of 64 fails there (`shape '[96, 1]' is invalid for
input of size 144`); such layers stay in full precision."""


def candidate_paths(model: nn.Module, config: QuantConfig) -> list[str]:
    """Linear / Conv1D layers QLoRA would quantize: all but the output head, fp32-pinned modules and `skip_modules`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(config.skip_modules)
    wrappers = [path for path, module in model.named_modules() if isinstance(module, AdapterLayerMixin)]

    def is_adapter_part(path: str) -> bool:  # an adapter's own layers (lora_A...) stay in full precision
        return any(path.startswith(w + ".") and path != w + ".base_layer" for w in wrappers)

    return [
        path for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head and not is_quantized(module)
        and not (keep and is_match(path, keep)) and not is_adapter_part(path)
    ]


def fits_blocks(layer: nn.Module, config: QuantConfig) -> bool:
    """Can bitsandbytes store this layer? 8-bit: always; 4-bit: when its input width is a multiple of BLOCK_SIZE."""
    in_features = layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.in_features
    return config.bits != 4 or in_features % BLOCK_SIZE == 0


def quantizable_paths(model: nn.Module, config: QuantConfig) -> list[str]:
    """The candidate layers bitsandbytes can store (see `fits_blocks`)."""
    return [p for p in candidate_paths(model, config) if fits_blocks(model.get_submodule(p), config)]


def quantized_linear(layer: nn.Module, config: QuantConfig, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `layer`'s weights (a Conv1D's (in, out) weight is transposed)."""
    import bitsandbytes as bnb

    weight = dense_weight(layer).detach().float().contiguous()  # (out, in)
    out_features, in_features = weight.shape
    device = weight.device
    has_bias = getattr(layer, "bias", None) is not None
    if config.bits == 4:
        new = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compute_dtype=dtype,
                                compress_statistics=config.double_quant, quant_type=config.quant_type, device="meta")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=config.double_quant,
                                       quant_type=config.quant_type, module=new)
    else:
        new = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0,
                                  device="meta")
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)  # quantizes
    if has_bias:
        new.bias = nn.Parameter(layer.bias.detach().to(dtype if config.bits == 4 else layer.bias.dtype), requires_grad=False)
    if config.bits == 4:
        new = new.to(device)  # Params4bit quantizes when moved to its device (Int8Params did above)
    setattr(new, CONV1D_SOURCE, isinstance(layer, Conv1D))
    return new


def quantize_base(model: nn.Module, config: QuantConfig, device: torch.device | str = "cpu") -> QuantReport:
    """Replace the base's linear layers by 4-bit / 8-bit bitsandbytes layers, in place (via inject.py)."""
    _require_bitsandbytes()
    dtype = compute_dtype(config, torch.device(device))
    before = weight_bytes(model)
    paths = quantizable_paths(model, config)
    unfit = [p for p in candidate_paths(model, config) if p not in paths]
    if not paths:
        raise ConfigError("quant: no linear layer of this model can be quantized (4-bit needs input widths that are "
                          f"multiples of {BLOCK_SIZE}); use quant.bits: 8 or method: lora")
    if unfit:
        log.warning("%d linear layer(s) stay in full precision: their input width is not a multiple of the 4-bit "
                    "block size %d: %s", len(unfit), BLOCK_SIZE, ", ".join(unfit))
    for path in paths:
        replace_module(model, path, quantized_linear(model.get_submodule(path), config, dtype))
    report = QuantReport(len(paths), before, weight_bytes(model))
    log.info("%s", report.describe())
    return report


def dense_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The float layer a quantized one stands for: nn.Linear, or Conv1D where it came from one."""
    weight = dense_weight(layer).detach().to(dtype)  # (out, in)
    bias = layer.bias.detach().to(dtype) if layer.bias is not None else None
    if getattr(layer, CONV1D_SOURCE, False):
        new: nn.Module = Conv1D(weight.shape[0], weight.shape[1])
        new.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
        new.bias = nn.Parameter(bias if bias is not None else torch.zeros(weight.shape[0], dtype=dtype), requires_grad=False)
        return new
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    return new


def dequantize_base(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes layer (also inside adapter wrappers) by its dequantized float layer."""
    paths = [path for path, module in model.named_modules() if is_quantized(module)]
    for path in paths:
        replace_module(model, path, dense_linear(model.get_submodule(path), dtype))
    return len(paths)


@torch.no_grad()
def merge_dequantized(
    adapted: Any, probe: dict[str, torch.Tensor], config: QuantConfig, name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, MergeReport]:
    """Dequantize the base, merge the adapter there and keep `dtype` weights; measure the error on `probe`.

    Re-quantizing W + BA would put the merged weights back on the 4-bit grid, where most of a LoRA
    update (far smaller than one quantization step) rounds away; the report measures that too.
    """
    trained = adapted(**probe).logits.float()
    dequantize_base(adapted.model, dtype)
    merged = adapted.merge_and_unload(name)
    error = float((merged(**probe).logits.float() - trained).abs().max())
    requantized = copy.deepcopy(merged)
    quantize_base(requantized, config)
    requant_error = float((requantized(**probe).logits.float() - trained).abs().max())
    del requantized
    log.warning(
        "merged into a %s copy of the dequantized base instead of re-quantizing it: max |logit difference| to the "
        "quantized model with its adapter is %.2e as saved, %.2e if re-quantized to %d-bit",
        str(dtype).replace("torch.", ""), error, requant_error, config.bits,
    )
    return merged, MergeReport(error, requant_error, dtype)


def trained_quantization(metadata: dict[str, Any]) -> QuantConfig | None:
    """The quantization a run's adapter was trained on (from its peftkit.json), or None if not QLoRA."""
    run = metadata.get("run_config") or {}
    if run.get("method") != "qlora":
        return None
    return QuantConfig(**run.get("quant", {}))


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("method qlora needs bitsandbytes: pip install 'peftkit[quant]'") from None
