"""Padding-free training: a micro-batch runs as ONE row of concatenated examples, attention per example.

A padded batch of lengths 64..512 is ~40% padding, all of it computed and thrown away. Packing into
fixed-length rows with a block-diagonal mask removes most of the padding but makes every row pay
full (rows x rows) attention, masked. Here the examples of a micro-batch are concatenated into one
row (no padding at all), position ids restart at each example, and attention runs per example with
the causal kernel (`is_causal=True`), so no mask is built and no cross-example score is computed.

It works through transformers' attention interface: the model's attention implementation becomes
`peftkit_sdpa` while training, which is PyTorch SDPA for ordinary batches and per-segment SDPA
when the forward is given `segment_bounds` (what `loss.model_inputs` passes for a flat batch).

Example:
    >>> with padding_free(model) as flat:
    ...     batch = collate([flat_example(examples)], pad_id) if flat else collate(examples, pad_id)
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import architecture_of
from ..data.batching import packed_example

IMPLEMENTATION = "peftkit_sdpa"


def _segment_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  segment_bounds: Sequence[int] | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segment_bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    sizes = [stop - start for start, stop in itertools.pairwise(segment_bounds)]
    # split (not slicing): its backward is one concatenation, where each slice's would be a zero-filled full copy
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2), strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (1, T, heads, head_dim)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _segment_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)  # ordinary batches: SDPA's own masks


def supports_padding_free(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (
        getattr(architecture_of(config), "padding_free", False)  # the architectures table says it is exact
        and not getattr(config, "is_encoder_decoder", False)
        and getattr(config, "_attn_implementation", None) in ("sdpa", IMPLEMENTATION)
    )


def enable_padding_free(model: nn.Module) -> bool:
    """Give `model` (a transformers model) per-segment attention for flat batches; False if it cannot.

    Ordinary batches keep SDPA's exact behaviour, and the implementation name is not saved with the
    config, so leaving it on after training changes nothing.
    """
    if not supports_padding_free(model):
        return False
    _register()
    model.config._attn_implementation = IMPLEMENTATION
    return True


@contextlib.contextmanager
def padding_free(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """`enable_padding_free` for a block; yields whether it is on, and restores the implementation."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    active = enabled and enable_padding_free(model)
    try:
        yield active
    finally:
        if active:
            model.config._attn_implementation = before


def flat_example(units: Sequence[Mapping[str, list[int]]]) -> dict[str, list[int]]:
    """Concatenate examples (or packed sequences of them) into one row with per-example segments.

    An example's first label is masked: nothing precedes it in a padded batch, and here the
    previous example would predict it. Packed units keep their own segments (already masked).
    """
    out: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
    segment = 0
    for unit in units:
        packed = unit if "segment_ids" in unit else packed_example([unit])  # one masking rule: batching's
        for key in ("input_ids", "labels", "position_ids"):
            out[key] += packed[key]
        out["segment_ids"] += [segment + s for s in packed["segment_ids"]]
        segment += max(packed["segment_ids"])
    return out


def segment_bounds(segment_ids: torch.Tensor) -> list[int]:
    """Start of every segment of a (1, T) row, and T: [0, n1, n1 + n2, ..., T]."""
    row = segment_ids[0]
    starts = torch.nonzero(row[1:] != row[:-1]).flatten() + 1
    return [0, *starts.tolist(), row.shape[0]]
