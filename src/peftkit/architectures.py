"""What peftkit knows about each model family, in one table: module names, head kind, padding-free support.

Methods read their default targets and sublayer positions here (LoRA: the query and value projections;
IA3: key, value and the feed-forward output projection; bottleneck: the attention and feed-forward
outputs; adaption prompts: the attention module); the training loop reads whether per-example attention
(padding-free rows) and the fused loss are exact. A new family is one row; a family without a row still
trains with explicit `target_modules`.

Names are leaf names (or dotted suffixes) of modules inside a transformer block, as transformers 5 spells them.

Example:
    >>> arch = architecture_of(model)          # None for a family not in the table
    >>> arch.query, arch.value                 # ('q_proj', 'v_proj')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """One model family (a transformers `model_type`)."""

    attention: str
    """The attention module inside a block (`self_attn`, `attn`, `SelfAttention`)."""
    query: str
    """Query projection (a fused q/k/v projection names the same layer in query, key and value)."""
    key: str
    """Key projection."""
    value: str
    """Value projection."""
    attention_output: str | None
    """Dotted suffix of the attention output projection (`self_attn.o_proj`); None where it is ambiguous."""
    mlp_output: str | None
    """Dotted suffix of the feed-forward output projection (`mlp.down_proj`); None where it is ambiguous."""
    head: Literal["plain", "other"] = "other"
    """plain: logits are exactly `head(last hidden state)` (no soft-capping or scaling), so the fused
    linear cross-entropy is exact; other: the loss goes through the model's own logits."""
    padding_free: bool = False
    """Attention goes through transformers' attention interface with rotary positions from `position_ids`,
    so concatenated examples with restarted positions and per-example attention are exact."""


_LLAMA = Architecture("self_attn", "q_proj", "k_proj", "v_proj", "self_attn.o_proj", "mlp.down_proj", "plain", True)
_ATTN_OUT = "self_attn.out_proj"

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "smollm3": _LLAMA,
    "gemma": Architecture("self_attn", "q_proj", "k_proj", "v_proj", "self_attn.o_proj", "mlp.down_proj"),
    "phi3": Architecture("self_attn", "qkv_proj", "qkv_proj", "qkv_proj", "self_attn.o_proj", "mlp.down_proj", "plain", True),
    "gpt2": Architecture("attn", "c_attn", "c_attn", "c_attn", "attn.c_proj", "mlp.c_proj", "plain"),
    "gpt_neox": Architecture("attention", "query_key_value", "query_key_value", "query_key_value", "attention.dense",
                             "mlp.dense_4h_to_h"),
    "opt": Architecture("self_attn", "q_proj", "k_proj", "v_proj", _ATTN_OUT, "fc2"),
    "bart": Architecture("self_attn", "q_proj", "k_proj", "v_proj", _ATTN_OUT, "fc2"),
    "t5": Architecture("SelfAttention", "q", "k", "v", "SelfAttention.o", "DenseReluDense.wo"),
    "mt5": Architecture("SelfAttention", "q", "k", "v", "SelfAttention.o", "DenseReluDense.wo"),
    # BERT's `output.dense` names both sublayer outputs (attention.output.dense too): no unambiguous suffix
    "bert": Architecture("attention", "query", "key", "value", None, None),
    "roberta": Architecture("attention", "query", "key", "value", None, None),
    "distilbert": Architecture("attention", "q_lin", "k_lin", "v_lin", "attention.out_lin", "ffn.lin2"),
    "vit": Architecture("attention", "q_proj", "k_proj", "v_proj", "attention.o_proj", "mlp.fc2"),
    # Whisper: self-attention of encoder and decoder (not cross-attention)
    "whisper": Architecture("self_attn", "q_proj", "k_proj", "v_proj", _ATTN_OUT, "fc2"),
}


def model_type(model: Any) -> str | None:
    """The transformers `model_type` of a model (or of its config)."""
    config = getattr(model, "config", model)
    return getattr(config, "model_type", None)


def architecture_of(model: Any) -> Architecture | None:
    """The table's row for `model` (a model or its config), or None for a family not in the table."""
    return ARCHITECTURES.get(model_type(model))  # type: ignore[arg-type]


def require_architecture(model: Any, needs: str, instead: str) -> Architecture:
    """The row for `model`, or a ConfigError saying which families have `needs` and what to do instead."""
    arch = architecture_of(model)
    if arch is None:
        raise ConfigError(
            f"{needs} is known for model types {', '.join(sorted(ARCHITECTURES))}, not {model_type(model)!r}; {instead}"
        )
    return arch


def unique(*names: str | None) -> list[str]:
    """Names in order, without repeats or Nones (a fused q/k/v projection is one layer)."""
    return [n for n in dict.fromkeys(names) if n is not None]
