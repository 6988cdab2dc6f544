"""Token-level cross-entropy that only materialises logits where there are labels.

With loss on the response only, most positions carry no label; computing the vocabulary-wide
logits there (batch x length x 49,152 floats) is most of the memory of the usual stack. For
decoder-only models whose head is a plain linear layer over the last hidden state, we run the
body, keep the labelled positions, and apply the head in chunks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import IGNORE_INDEX

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


def loss_sum_and_count(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token losses over labelled target positions, and their count (for exact accumulation)."""
    labels = batch["labels"]
    inner = _inner(model)
    if getattr(inner.config, "is_encoder_decoder", False):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        logits = out.logits.float()
        count = int((labels != IGNORE_INDEX).sum())
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"), count
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    count = int(keep.sum())
    if supports_selective_logits(model):
        body = getattr(inner, inner.base_model_prefix)
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **_extra(batch)).last_hidden_state
        selected = hidden[:, :-1][keep]  # (N, H): only positions that predict a label
        head = inner.get_output_embeddings()
        wanted = targets[keep]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, selected.shape[0], CHUNK):
            logits = head(selected[start : start + CHUNK]).float()
            total = total + F.cross_entropy(logits, wanted[start : start + CHUNK], reduction="sum")
        return total, count
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **_extra(batch))
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"), count


def _extra(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in ("position_ids",) if k in batch}
