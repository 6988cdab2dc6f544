"""A transformers causal LM (merged or fully fine-tuned) as one GGUF file llama.cpp loads.

Example:
    >>> write_model_gguf(model, tokenizer, "model.gguf", dtype="q8_0", extra={"peftkit.source": "runs/x"})
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ExportError
from ..io import atomic_file
from .layouts import GgufLayout, gguf_layout, permute_rope_rows, rope_heads
from .tokenizer import write_tokenizer

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
DTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
NOT_WEIGHTS = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
"""Buffers some transformers versions keep in the state dict; llama.cpp recomputes them."""


def file_type(dtype: str) -> gguf.LlamaFileType:
    """`general.file_type` for a `--dtype` name."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype][0]


def tensor_type(gguf_name: str, shape: tuple[int, ...], dtype: str) -> gguf.GGMLQuantizationType:
    """The storage type of one tensor: llama.cpp keeps vectors, norms and position embeddings in f32
    (convert_hf_to_gguf.py's rules); a q8_0 row must hold whole blocks of 32, else it falls back to f16."""
    wanted = DTYPES[dtype][1]
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or gguf_name.startswith("position_embd."):
        return Q.F32
    if wanted == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        log.debug("%s: rows of %d values are not whole q8_0 blocks; stored as f16", gguf_name, shape[-1])
        return Q.F16
    return wanted


def add_tensor(writer: gguf.GGUFWriter, gguf_name: str, tensor: torch.Tensor, dtype: str) -> None:
    """Encode a float tensor (in GGUF's (out, in) layout) in the type `tensor_type` picks and queue it."""
    array = tensor.detach().to(torch.float32).contiguous().numpy()
    qtype = tensor_type(gguf_name, array.shape, dtype)
    writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def is_tied(model: nn.Module) -> bool:
    """Does the output head share the input embedding's storage (llama.cpp then reuses token_embd)?"""
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def model_tensors(model: nn.Module, arch: GgufLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in GGUF's layout) for every weight of `model`."""
    config = model.config
    names = gguf.get_tensor_name_map(arch.gguf_arch, arch.hparams(config)["block_count"])
    tied_head = next(f"{name}.weight" for name, module in model.named_modules()
                     if module is model.get_output_embeddings()) if is_tied(model) else None
    for name, tensor in model.state_dict().items():
        if name.endswith(NOT_WEIGHTS) or name == tied_head:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"tensor {name} has no place in llama.cpp's {arch.name} layout; the model is not a plain "
                              f"{arch.model_type} (extra modules are not exported)")
        module_path, _, kind = name.rpartition(".")
        if kind == "weight" and isinstance(model.get_submodule(module_path), Conv1D):
            tensor = tensor.T  # (in, out) -> (out, in)
        heads = rope_heads(gguf_name, config) if arch.rope_permute else None
        if heads is not None:
            tensor = permute_rope_rows(tensor, heads)
        yield gguf_name, tensor


def write_model_gguf(model: nn.Module, tokenizer: Any, out: str | Path, dtype: str = "f32",
                     extra: dict[str, str] | None = None) -> Path:
    """Write `model` with its tokenizer and chat template as one GGUF file, atomically.

    `extra`: string metadata under the writer's own keys (llama.cpp ignores keys it does not know).
    """
    ftype = file_type(dtype)
    arch = gguf_layout(model.config)
    out = Path(out)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(out.stem)
        for key, value in arch.hparams(model.config).items():
            _add_value(writer, f"{arch.name}.{key}", value)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
        for key, value in (extra or {}).items():
            writer.add_string(key, value)
        for gguf_name, tensor in model_tensors(model, arch):
            add_tensor(writer, gguf_name, tensor, dtype)
        write_header_and_tensors(writer)
    return out


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, int(value))


def write_header_and_tensors(writer: gguf.GGUFWriter) -> None:
    """Header, metadata and tensors to the writer's file, then close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
