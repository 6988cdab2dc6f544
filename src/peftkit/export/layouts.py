"""GGUF layouts: for each architecture the exporter writes, llama.cpp's names and tensor layouts.

What llama.cpp expects is read from its own converter (`convert_hf_to_gguf.py`, classes
`LlamaModel`, `Qwen2Model`, `GPT2Model`) and gguf-py's tensor name table:

- Llama (SmolLM2 is one): q and k rows go from transformers' rotate-half layout back to the
  interleaved pairs llama.cpp's RoPE reads (`LlamaModel.permute`); k uses the kv head count.
- Qwen2: the same tensor names plus q/k/v biases, and no permutation (llama.cpp's qwen2 uses
  NeoX-style RoPE, which is transformers' layout).
- GPT-2: Conv1D stores weights (in, out); GGUF wants (out, in), as for every other linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gguf
import torch

from ..errors import ExportError


@dataclass(frozen=True)
class GgufLayout:
    """One transformers `model_type` and how it becomes a GGUF file."""

    model_type: str
    gguf_arch: gguf.MODEL_ARCH
    rope_permute: bool
    """q/k rows reordered from rotate-half (transformers) to interleaved pairs (llama.cpp)."""
    hparams: Callable[[Any], dict[str, Any]]
    """GGUF key (without the `<arch>.` prefix) -> value, from the transformers config."""
    activation: tuple[str, str]
    """(config attribute, the only value llama.cpp's graph for this architecture computes)."""

    @property
    def name(self) -> str:
        """llama.cpp's architecture name (`general.architecture`)."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


def rope_theta(config: Any) -> float:
    """RoPE base frequency; only plain RoPE is exported (scaled variants need extra tensors or keys)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise ExportError(f"RoPE scaling {kind!r} is not exported to GGUF; only models with plain RoPE are")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _decoder_hparams(config: Any) -> dict[str, Any]:
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads or config.num_attention_heads,
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.freq_base": rope_theta(config),
        "vocab_size": config.vocab_size,
    }


def _llama_hparams(config: Any) -> dict[str, Any]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ExportError(f"head_dim {head_dim} x {config.num_attention_heads} heads != hidden_size {config.hidden_size}; "
                          "llama.cpp's llama graph assumes they are equal")
    if getattr(config, "mlp_bias", False):
        raise ExportError("mlp_bias: true is not exported (llama.cpp's llama graph has no feed-forward biases)")
    return {**_decoder_hparams(config), "rope.dimension_count": head_dim}


def _qwen2_hparams(config: Any) -> dict[str, Any]:
    if getattr(config, "use_sliding_window", False):
        raise ExportError("use_sliding_window: true is not exported (llama.cpp's qwen2 attends to the whole context)")
    return _decoder_hparams(config)


def _gpt2_hparams(config: Any) -> dict[str, Any]:
    return {
        "context_length": config.n_positions,
        "embedding_length": config.n_embd,
        "block_count": config.n_layer,
        "feed_forward_length": config.n_inner or 4 * config.n_embd,
        "attention.head_count": config.n_head,
        "attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
    }


GGUF_LAYOUTS: dict[str, GgufLayout] = {
    "llama": GgufLayout("llama", gguf.MODEL_ARCH.LLAMA, True, _llama_hparams, ("hidden_act", "silu")),
    "qwen2": GgufLayout("qwen2", gguf.MODEL_ARCH.QWEN2, False, _qwen2_hparams, ("hidden_act", "silu")),
    "gpt2": GgufLayout("gpt2", gguf.MODEL_ARCH.GPT2, False, _gpt2_hparams, ("activation_function", "gelu_new")),
}


def gguf_layout(config: Any) -> GgufLayout:
    """The exporter's entry for a transformers config, or a message naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    arch = GGUF_LAYOUTS.get(model_type)
    if arch is None:
        raise ExportError(f"architecture {model_type!r} is not exported to GGUF; supported: "
                          f"{', '.join(GGUF_LAYOUTS)} (Llama/SmolLM2, Qwen2, GPT-2)")
    attribute, expected = arch.activation
    if getattr(config, attribute, expected) != expected:
        raise ExportError(f"{attribute}: {getattr(config, attribute)!r} is not exported: llama.cpp's {arch.name} graph "
                          f"computes {expected}")
    return arch


def permute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection (or its bias, or a LoRA B) from rotate-half to interleaved order.

    Within each head, transformers keeps the first halves of the rotated pairs, then the second
    halves; llama.cpp keeps each pair adjacent. Same as `LlamaModel.permute` in convert_hf_to_gguf.py.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def rope_heads(gguf_name: str, config: Any) -> int | None:
    """How many heads a tensor's rows are permuted over: q: attention heads, k: kv heads, others: None."""
    base = gguf_name.split(".")[-2] if gguf_name.count(".") >= 2 else ""
    if base == "attn_q":
        return config.num_attention_heads
    if base == "attn_k":
        return config.num_key_value_heads or config.num_attention_heads
    return None
