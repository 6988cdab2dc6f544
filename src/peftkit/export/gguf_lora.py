"""A LoRA adapter as llama.cpp's LoRA GGUF, applied to the base GGUF with `--lora`.

llama.cpp adds `scale * alpha / r * B (A x)` to each adapted weight's output, where r is read from
A's shape and alpha from `adapter.lora.alpha` (llama-adapter.cpp). Tensors are named after the base
weight they adapt (`blk.0.attn_q.weight.lora_a` / `.lora_b`) and, like the base, B's rows of q and k
are permuted into llama.cpp's RoPE order (A acts on the input side, which is not permuted).

Example:
    >>> write_lora_gguf("runs/default/adapter", base_config, "adapter.gguf", dtype="f16")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from ..adapters import PEFT_PREFIX, read_adapter_config, read_adapter_weights
from ..errors import ExportError
from ..io import atomic_file
from ..methods.lora import lora_scaling
from .gguf_model import add_tensor, file_type, write_header_and_tensors
from .layouts import gguf_layout, permute_rope_rows, rope_heads

MERGEABLE = ("LORA", "PEFTKIT_SELECTIVE")
"""peft_types `peftkit export` can still fold into a merged GGUF when llama.cpp cannot apply them."""


@dataclass
class LoraPair:
    """One adapted weight: its module path and the adapter's A (r, in) and B (out, r)."""

    path: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor


def refusal(adapter: Path, why: str, peft_type: str) -> ExportError:
    """Why llama.cpp cannot apply this adapter, and what can still be exported."""
    hint = ("drop --adapter-only to export the merged model instead" if peft_type in MERGEABLE
            else "it cannot be merged into the weights either, so no GGUF file can carry it")
    return ExportError(f"{adapter}: not exportable as a llama.cpp LoRA adapter: {why}; {hint}")


def lora_pairs(adapter: Path) -> tuple[Any, list[LoraPair]]:
    """(LoraConfig, the adapted weights), or a refusal naming what llama.cpp cannot apply."""
    config, raw = read_adapter_config(adapter)
    peft_type = raw["peft_type"]
    if peft_type != "LORA":
        raise refusal(adapter, f"{peft_type} is not LoRA, and llama.cpp's --lora adds only low-rank weight updates "
                               "(W + alpha/r B A)", peft_type)
    if config.use_dora:
        raise refusal(adapter, "DoRA rescales each output row by a learned magnitude, which llama.cpp does not apply",
                      peft_type)
    if config.modules_to_save:
        raise refusal(adapter, f"modules_to_save {config.modules_to_save} are whole trained copies of base modules, "
                               "not low-rank updates", peft_type)
    if (adapter / "tokenizer_config.json").is_file():
        raise refusal(adapter, "it was trained with added tokens (resized embeddings), which a LoRA file cannot carry",
                      peft_type)
    weights = read_adapter_weights(adapter)
    paths = sorted({key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for key in weights if ".lora_A." in key})
    pairs = [LoraPair(p, weights[f"{PEFT_PREFIX}{p}.lora_A.weight"], weights[f"{PEFT_PREFIX}{p}.lora_B.weight"])
             for p in paths]
    if 2 * len(pairs) != len(weights):
        raise refusal(adapter, "it holds tensors besides LoRA's A and B matrices", peft_type)
    return config, pairs


def write_lora_gguf(adapter: str | Path, base_config: Any, out: str | Path, dtype: str = "f16") -> tuple[Path, int]:
    """Write the adapter at `adapter` (trained on a base with `base_config`) as a llama.cpp LoRA GGUF,
    atomically; returns (path, number of adapted weights)."""
    adapter, out = Path(adapter), Path(out)
    ftype = file_type(dtype)
    layout = gguf_layout(base_config)
    config, pairs = lora_pairs(adapter)
    names = gguf.get_tensor_name_map(layout.gguf_arch, layout.hparams(base_config)["block_count"])
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, layout.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) is the same product with alpha * sqrt(r)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_scaling(config) * config.r)
        writer.add_name(adapter.name)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for pair in pairs:
            target = names.get_name(f"{pair.path}.weight", try_suffixes=(".weight",))
            if target is None or (tied and target == "output.weight"):
                raise refusal(adapter, f"{pair.path} is not a weight llama.cpp's {layout.name} model holds"
                                       + (" (the output head shares the embedding)" if target else ""), "LORA")
            heads = rope_heads(target, base_config) if layout.rope_permute else None
            lora_b = permute_rope_rows(pair.lora_b, heads) if heads is not None else pair.lora_b
            add_tensor(writer, f"{target}.lora_a", pair.lora_a, dtype)
            add_tensor(writer, f"{target}.lora_b", lora_b, dtype)
        write_header_and_tensors(writer)
    return out, len(pairs)
