"""Token-level cross-entropy that only materialises logits where there are labels.

With loss on the response only, most positions carry no label; computing the vocabulary-wide
logits there (batch x length x 49,152 floats) is most of the memory of the usual stack. For
decoder-only models whose head is a plain linear layer over the last hidden state, we run the
body, keep the labelled positions, and apply the head with `linear_cross_entropy`: chunk by
chunk, the logits, the loss and the gradient of the loss with respect to the hidden states (and
the head, if it trains) are computed at once and the logits dropped, so no (tokens x vocabulary)
tensor outlives its chunk (the trick of Liger-Kernel's fused linear cross-entropy).

The head is read through the module that computes it (`fused_head`): a plain linear layer, tied
or not, resized for added tokens or not; the trained copy of a `modules_to_save` head; a LoRA
head's base weight PLUS its low-rank term s B A dropout(h), whose gradients reach lora_A and
lora_B. Where the fused loss could not equal the head's own output (DoRA's row rescaling, a
quantized or Conv1D-layout base), it says so once and the loss goes through the full logits.

The loss is returned as a SUM with the count of target tokens beside it, so gradient
accumulation (and several processes) can divide by the step's total count exactly once.
Packed batches carry `segment_ids`; both paths turn them into a 4D block-diagonal mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import architecture_of
from ..data.batching import IGNORE_INDEX, block_causal_mask
from ..methods.lora import LoraLinear, ModulesToSave
from .attention import IMPLEMENTATION, segment_bounds

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2**25
"""Logit elements per chunk (128 MiB in fp32): 1,024 rows of GPT-2's vocabulary, 682 of SmolLM2's."""


def _inner(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "adapter_configs") else model  # unwrap AdaptedModel


def supports_selective_logits(model: nn.Module) -> bool:
    inner = _inner(model)
    config = getattr(inner, "config", None)
    return (
        getattr(architecture_of(config), "head", None) == "plain"  # logits are exactly head(last hidden state)
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
    head = fused_head(inner.get_output_embeddings()) if supports_selective_logits(model) else None
    if head is None:
        logits = model(**inputs).logits[:, :-1][keep].float()  # (N, V)
        return F.cross_entropy(logits, targets[keep], reduction="none")
    adapt = getattr(model, "adapt_inputs", None)  # an active soft prompt / prefix adds itself to the inputs
    inputs, virtual = adapt(inputs) if adapt is not None else (inputs, 0)
    hidden = getattr(inner, inner.base_model_prefix)(**inputs).last_hidden_state[:, virtual:]  # drop virtual tokens
    selected = hidden[:, :-1][keep]  # (N, H): only positions that predict a label
    if selected.shape[0] == 0:
        return hidden.float().sum()[None] * 0  # no targets: zero, still in the graph
    return head.cross_entropy(selected, targets[keep])


@dataclass
class FusedHead:
    """The output head as `hidden @ weight.T + bias`, plus a LoRA adapter's `s B A dropout(hidden)` when it has one:
    what `linear_cross_entropy` needs to equal the head module's own output."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: LoraLinear | None = None
    """A LoRA-wrapped head: its active adapter adds the low-rank term."""

    def cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy of the head's logits for `hidden` (N, H) against `targets` (N,)."""
        if self.lora is None:
            return linear_cross_entropy(hidden, self.weight, self.bias, targets)
        name = self.lora.active_adapter
        lora_a, lora_b = self.lora.lora_A[name].weight, self.lora.lora_B[name].weight
        projected = self.lora.lora_dropout[name](hidden.to(lora_a.dtype)) @ lora_a.T  # (N, r)
        return linear_cross_entropy(hidden, self.weight, self.bias, targets, (projected, lora_b * self.lora.scaling[name]))


def fused_head(head: nn.Module) -> FusedHead | None:
    """`head` as a FusedHead, or None where the fused loss could not equal it (logged; the caller computes logits).

    Exact: a plain linear head (tied or not, resized or not, trained or frozen); `modules_to_save` (its active
    copy, or the original when disabled); LoRA on a plain linear head (active, merged or disabled). Not: DoRA
    (its magnitude rescales whole rows), a quantized or Conv1D-layout base, any other wrapper.
    """
    if isinstance(head, ModulesToSave):
        return fused_head(head.original_module if head.active_adapter is None else head.modules_to_save[head.active_adapter])
    if isinstance(head, LoraLinear):
        base = fused_head(head.base_layer) if not head.fan_in_fan_out else None
        name = head.active_adapter
        if base is None or base.lora is not None:
            return _not_fused(head, "a LoRA head over a quantized, Conv1D or wrapped layer")
        if name is None or name in head.merged_adapters:
            return base  # disabled, or merged into the base weight
        if name in head.lora_magnitude_vector:
            return _not_fused(head, "DoRA rescales the head's rows by a learned magnitude")
        return FusedHead(base.weight, base.bias, head)
    if type(head) is nn.Linear:
        return FusedHead(head.weight, head.bias)
    return _not_fused(head, "not a linear layer")


_REPORTED: set[str] = set()


def _not_fused(head: nn.Module, why: str) -> None:
    """Say once per kind of head that the loss goes through the model's full logits."""
    key = f"{type(head).__name__}: {why}"
    if key not in _REPORTED:
        _REPORTED.add(key)
        log.warning("fused linear cross-entropy off for the output head (%s); computing full logits instead", key)
    return None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight.T (+ bias) (+ u @ v.T)` against `targets`, never holding all logits.

    `low_rank` = (u (N, r), v (V, r)): a LoRA head's term, u = dropout(hidden) A^T and v = s B.
    Equal to `F.cross_entropy(logits.float(), targets, reduction="none")` with the logits computed as the
    head module does (the base in the weights' dtype, the LoRA term in its own dtype, added in the base's),
    in value and gradients (softmax in fp32).
    """
    pairs = (hidden, weight) if low_rank is None else (hidden, weight, *low_rank)
    return _LinearCrossEntropy.apply(targets, bias, *pairs)


def _chunk_logits(start: int, stop: int, bias: torch.Tensor | None, pairs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """fp32 logits of rows start:stop: sum over (x, w) pairs of x @ w.T, plus the bias on the first."""
    logits = F.linear(pairs[0][start:stop], pairs[1], bias)
    for x, w in zip(pairs[2::2], pairs[3::2]):
        logits = logits + F.linear(x[start:stop], w).to(logits.dtype)
    return logits.float()


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes each chunk's loss AND its gradients (for a weight of 1 per token); backward scales them.

    Inputs are (targets, bias, x0, w0, x1, w1, ...) with logits = sum_k x_k @ w_k.T + bias: the head's
    hidden states and weight, then a LoRA head's (u, s B). A token's loss depends only on its own rows
    of the x_k, so their gradients scale row by row with any upstream gradient. The weights' (and
    bias's) gradients sum over tokens: exact for the usual upstream gradient (the same weight for
    every token, as `.sum() * scale` gives), and recomputed chunk by chunk otherwise.
    """

    @staticmethod
    def forward(ctx: Any, targets: torch.Tensor, bias: torch.Tensor | None, *pairs: torch.Tensor) -> torch.Tensor:
        need_b, need = ctx.needs_input_grad[1], ctx.needs_input_grad[2:]
        rows, vocab = pairs[0].shape[0], pairs[1].shape[0]
        losses = torch.empty(rows, dtype=torch.float32, device=targets.device)
        grads = [(torch.empty_like(t) if k % 2 == 0 else torch.zeros_like(t, dtype=torch.float32)) if need[k] else None
                 for k, t in enumerate(pairs)]  # rows' grads in their dtype; weights' accumulate in fp32
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start, stop in _chunks(rows, vocab):
            t = targets[start:stop]
            logits = _chunk_logits(start, stop, bias, pairs)
            lse = torch.logsumexp(logits, dim=-1)
            losses[start:stop] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if not (need_b or any(need)):
                continue
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dlogits[torch.arange(len(t), device=t.device), t] -= 1
            _add_chunk_grads(dlogits, start, stop, pairs, grads, rows_too=True)
            if need_b:
                grad_b += dlogits.sum(0)
        ctx.save_for_backward(targets, bias, grad_b, *pairs, *[g if g is not None else torch.empty(0) for g in grads])
        ctx.has_grad = [g is not None for g in grads]
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        targets, bias, grad_b, *rest = ctx.saved_tensors
        half = len(rest) // 2
        pairs, grads = rest[:half], [g if has else None for g, has in zip(rest[half:], ctx.has_grad)]
        first = grad_losses[:1]
        if not bool((grad_losses == first).all()) and (grad_b is not None or any(g is not None for g in grads[1::2])):
            grads, grad_b = _weighted_head_grads(targets, bias, pairs, grads, grad_b, grad_losses)  # uneven token weights
            first = torch.ones_like(first)
        out = []
        for k, (tensor, grad) in enumerate(zip(pairs, grads)):
            if grad is None:
                out.append(None)
            elif k % 2 == 0:  # a row input: its rows scale with their tokens' upstream gradient
                out.append(grad * grad_losses[:, None].to(grad.dtype))
            else:
                out.append((grad * first).to(tensor.dtype))
        out_b = (grad_b * first).to(bias.dtype) if grad_b is not None else None
        return (None, out_b, *out)


def _add_chunk_grads(dlogits: torch.Tensor, start: int, stop: int, pairs: tuple[torch.Tensor, ...],
                     grads: list[torch.Tensor | None], rows_too: bool) -> None:
    """Add one chunk's gradients (d loss / d logits = `dlogits`) to each (x, w) pair's buffers."""
    for k in range(0, len(pairs), 2):
        x, w = pairs[k], pairs[k + 1]
        if rows_too and grads[k] is not None:
            grads[k][start:stop] = (dlogits.to(w.dtype) @ w).to(x.dtype)
        if grads[k + 1] is not None:
            grads[k + 1].addmm_(dlogits.T, x[start:stop].float())


def _chunks(rows: int, vocab: int) -> list[tuple[int, int]]:
    size = max(64, CHUNK_ELEMENTS // max(1, vocab))
    return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def _weighted_head_grads(
    targets: torch.Tensor, bias: torch.Tensor | None, pairs: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None],
    grad_b: torch.Tensor | None, weights: torch.Tensor,
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """The weights' and bias's gradients again, each token's term scaled by its upstream gradient."""
    grads = [g if k % 2 == 0 else (torch.zeros_like(g) if g is not None else None) for k, g in enumerate(grads)]
    grad_b = torch.zeros_like(grad_b) if grad_b is not None else None
    for start, stop in _chunks(pairs[0].shape[0], pairs[1].shape[0]):
        t = targets[start:stop]
        dlogits = _chunk_logits(start, stop, bias, pairs).softmax(-1)
        dlogits[torch.arange(len(t), device=t.device), t] -= 1
        dlogits *= weights[start:stop, None].float()
        _add_chunk_grads(dlogits, start, stop, pairs, grads, rows_too=False)
        if grad_b is not None:
            grad_b += dlogits.sum(0)
    return grads, grad_b


def loss_sum_and_count(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token losses over labelled target positions, and their count (for exact accumulation)."""
    seq2seq = bool(getattr(_inner(model).config, "is_encoder_decoder", False))
    return token_losses(model, batch).sum(), target_count(batch, seq2seq)

