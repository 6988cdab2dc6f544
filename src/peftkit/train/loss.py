"""Token-level cross-entropy that only materialises logits where there are labels.

With loss on the response only, most positions carry no label; computing the vocabulary-wide
logits there (batch x length x 49,152 floats) is most of the memory of the usual stack. For
decoder-only models whose head is a plain linear layer over the last hidden state, we run the
body, keep the labelled positions, and apply the head in chunks.

The loss is returned as a SUM with the count of target tokens beside it, so gradient
accumulation (and several processes) can divide by the step's total count exactly once.
Packed batches carry `segment_ids`; both paths turn them into a 4D block-diagonal mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import IGNORE_INDEX, block_causal_mask

# Decoder-only families whose logits are exactly lm_head(last_hidden_state) (no soft-capping or scaling).
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo", "olmo2", "smollm3"}
CHUNK = 1024


def _inner(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "adapter_configs") else model  # unwrap AdaptedModel


def supports_selective_logits(model: nn.Module) -> bool:
    inner = _inner(model)
    config = getattr(inner, "config", None)
    return (
        getattr(config, "model_type", None) in PLAIN_HEAD_TYPES
        and not getattr(config, "is_encoder_decoder", False)
        and hasattr(inner, getattr(inner, "base_model_prefix", ""))
        and inner.get_output_embeddings() is not None
    )


def target_count(batch: dict[str, torch.Tensor], seq2seq: bool) -> int:
    """Positions that carry a label after the causal shift (all labels for seq2seq)."""
    labels = batch["labels"] if seq2seq else batch["labels"][:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def model_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Forward kwargs: a packed batch's segments become a (B, 1, T, T) block-diagonal causal mask."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "segment_ids" in batch:
        inputs["attention_mask"] = block_causal_mask(batch["segment_ids"], dtype)
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each labelled target token, in row-major order of the (shifted) labels."""
    labels = batch["labels"]
    inner = _inner(model)
    if getattr(inner.config, "is_encoder_decoder", False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits.float()
        keep = labels != IGNORE_INDEX
        return F.cross_entropy(logits[keep], labels[keep], reduction="none")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    inputs = model_inputs(batch, inner.dtype)
    if not supports_selective_logits(model):
        logits = model(**inputs).logits[:, :-1][keep].float()  # (N, V)
        return F.cross_entropy(logits, targets[keep], reduction="none")
    adapt = getattr(model, "adapt_inputs", None)  # an active soft prompt / prefix adds itself to the inputs
    inputs, virtual = adapt(inputs) if adapt is not None else (inputs, 0)
    hidden = getattr(inner, inner.base_model_prefix)(**inputs).last_hidden_state[:, virtual:]  # drop virtual tokens
    selected = hidden[:, :-1][keep]  # (N, H): only positions that predict a label
    head = inner.get_output_embeddings()
    wanted = targets[keep]
    chunks = [
        F.cross_entropy(head(selected[start : start + CHUNK]).float(), wanted[start : start + CHUNK], reduction="none")
        for start in range(0, selected.shape[0], CHUNK)
    ]
    return torch.cat(chunks) if chunks else hidden.float().sum()[None] * 0  # no targets: zero, still in the graph


def loss_sum_and_count(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token losses over labelled target positions, and their count (for exact accumulation)."""
    seq2seq = bool(getattr(_inner(model).config, "is_encoder_decoder", False))
    return token_losses(model, batch).sum(), target_count(batch, seq2seq)


class LossForward(nn.Module):
    """`forward(batch) -> summed token loss`: the module DDP / FSDP wrap, so their hooks see one forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return token_losses(self.model, batch).sum()
