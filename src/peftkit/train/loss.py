"""Token-level cross-entropy that only materialises logits where there are labels.

With loss on the response only, most positions carry no label; computing the vocabulary-wide
logits there (batch x length x 49,152 floats) is most of the memory of the usual stack. For
decoder-only models whose head is a plain linear layer over the last hidden state, we run the
body, keep the labelled positions, and apply the head with `linear_cross_entropy`: chunk by
chunk, the logits, the loss and the gradient of the loss with respect to the hidden states (and
the head, if it trains) are computed at once and the logits dropped, so no (tokens x vocabulary)
tensor outlives its chunk (the trick of Liger-Kernel's fused linear cross-entropy).

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
from .attention import IMPLEMENTATION, segment_bounds

# Decoder-only families whose logits are exactly lm_head(last_hidden_state) (no soft-capping or scaling).
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo", "olmo2", "smollm3"}
CHUNK_ELEMENTS = 2**25
"""Logit elements per chunk (128 MiB in fp32): 1,024 rows of GPT-2's vocabulary, 682 of SmolLM2's."""


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


def model_config_implementation(model: nn.Module | None) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def model_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype, model: nn.Module | None = None) -> dict[str, Any]:
    """Forward kwargs: a packed batch's segments become a (B, 1, T, T) block-diagonal causal mask, or,
    for a one-row padding-free batch under `attention.padding_free`, per-segment attention bounds."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "segment_ids" in batch and batch["input_ids"].shape[0] == 1 and model_config_implementation(model) == IMPLEMENTATION:
        # one padding-free row (attention.flat_example): per-example causal attention, no mask at all
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "segment_bounds": segment_bounds(batch["segment_ids"])}
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
    inputs = model_inputs(batch, inner.dtype, inner)
    if not supports_selective_logits(model):
        logits = model(**inputs).logits[:, :-1][keep].float()  # (N, V)
        return F.cross_entropy(logits, targets[keep], reduction="none")
    adapt = getattr(model, "adapt_inputs", None)  # an active soft prompt / prefix adds itself to the inputs
    inputs, virtual = adapt(inputs) if adapt is not None else (inputs, 0)
    hidden = getattr(inner, inner.base_model_prefix)(**inputs).last_hidden_state[:, virtual:]  # drop virtual tokens
    selected = hidden[:, :-1][keep]  # (N, H): only positions that predict a label
    head = inner.get_output_embeddings()
    if selected.shape[0] == 0:
        return hidden.float().sum()[None] * 0  # no targets: zero, still in the graph
    return linear_cross_entropy(selected, head.weight, head.bias, targets[keep])


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, never holding all logits.

    Equal to `F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")`
    in value and gradients (logits in the weights' dtype, softmax in fp32).
    """
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes each chunk's loss AND its gradients (for a weight of 1 per token); backward scales them.

    A token's loss depends only on its own hidden row, so d(loss)/d(hidden) scales row by row with
    any upstream gradient. The head's gradient sums over tokens: it is exact for the usual upstream
    gradient (the same weight for every token, as `.sum() * scale` gives), and recomputed chunk by
    chunk otherwise.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start, stop in _chunks(hidden.shape[0], weight.shape[0]):
            h, t = hidden[start:stop], targets[start:stop]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            losses[start:stop] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if not (need_h or need_w or need_b):
                continue
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dlogits[torch.arange(len(t), device=t.device), t] -= 1
            if need_h:
                grad_h[start:stop] = dlogits.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(dlogits.T, h.float())
            if need_b:
                grad_b += dlogits.sum(0)
        ctx.save_for_backward(hidden, weight, bias, targets, grad_h, grad_w, grad_b)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, grad_h, grad_w, grad_b = ctx.saved_tensors
        out_h = (grad_h * grad_losses[:, None].to(grad_h.dtype)) if grad_h is not None else None
        if grad_w is None and grad_b is None:
            return out_h, None, None, None
        first = grad_losses[:1]
        if not bool((grad_losses == first).all()):  # uneven token weights: the head's gradient again, weighted
            grad_w, grad_b = _weighted_head_grads(hidden, weight, bias, targets, grad_losses, grad_w is not None,
                                                  grad_b is not None)
            first = torch.ones_like(first)
        out_w = (grad_w * first).to(weight.dtype) if grad_w is not None else None
        out_b = (grad_b * first).to(bias.dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None


def _chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    size = max(64, CHUNK_ELEMENTS // max(1, vocab))
    return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def _weighted_head_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         weights: torch.Tensor, need_w: bool, need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
    for start, stop in _chunks(hidden.shape[0], weight.shape[0]):
        h, t = hidden[start:stop], targets[start:stop]
        logits = F.linear(h, weight, bias).float()
        dlogits = logits.softmax(-1)
        dlogits[torch.arange(len(t), device=t.device), t] -= 1
        dlogits *= weights[start:stop, None].float()
        if need_w:
            grad_w.addmm_(dlogits.T, h.float())
        if need_b:
            grad_b += dlogits.sum(0)
    return grad_w, grad_b


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
