"""Batches: right-padded collation, length-grouped order, and packing with block-diagonal attention.

Padding is masked by length, never by token id: SmolLM2's pad id equals its EOS id, and the EOS
label must survive so the tuned model learns to stop.

Packing puts several examples in one sequence. Restarting `position_ids` alone does NOT keep
them apart (attention still crosses the boundary), so a packed batch carries `segment_ids` and
the forward pass gets a 4D block-diagonal causal mask built from them (`block_causal_mask`).

Example:
    >>> packs = pack_examples([len(e["input_ids"]) for e in examples], capacity=512, seed=0)
    >>> batch = collate([packed_example([examples[i] for i in p]) for p in packs[:8]], pad_id=2)
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch

IGNORE_INDEX = -100


def collate(examples: Sequence[Mapping[str, list[int]]], pad_id: int, seq2seq: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a batch. The attention mask and the -100 labels come from lengths, never from pad ids.

    Packed examples (with `segment_ids`) also give `position_ids` and `segment_ids` (0 = padding).
    """
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    label_width = max(len(e["labels"]) for e in examples) if seq2seq else width
    labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        attention[i, :n] = 1
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if "segment_ids" in examples[0]:
        batch["position_ids"] = torch.zeros_like(input_ids)
        batch["segment_ids"] = torch.zeros_like(input_ids)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["position_ids"][i, :n] = torch.tensor(e["position_ids"])
            batch["segment_ids"][i, :n] = torch.tensor(e["segment_ids"])
    return batch


def length_grouped_order(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches by length, so batches hold similar lengths.

    Batches are shuffled again so long and short ones are interleaved (the group_by_length recipe).
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    grouped = []
    for start in range(0, len(order), window):
        grouped.extend(sorted(order[start : start + window], key=lambda i: -lengths[i]))
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches


# -- packing --------------------------------------------------------------------------------------
def pack_examples(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Group example indices into sequences of at most `capacity` tokens (first-fit decreasing).

    Ties are broken by a seeded shuffle, so the packing is a pure function of (lengths, seed).
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for p, free in enumerate(room):
            if lengths[i] <= free:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(capacity - lengths[i])
    return packs


def packed_example(examples: Sequence[Mapping[str, list[int]]]) -> dict[str, list[int]]:
    """Concatenate examples into one sequence; positions restart and each gets its own segment id.

    The first label of every example is masked: in an unpacked batch it is never predicted (nothing
    precedes it), and here it would be predicted from the previous example.
    """
    out: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
    for segment, e in enumerate(examples, 1):
        n = len(e["input_ids"])
        out["input_ids"] += e["input_ids"]
        out["labels"] += [IGNORE_INDEX] + list(e["labels"][1:])
        out["position_ids"] += list(range(n))
        out["segment_ids"] += [segment] * n
    return out


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, T): 0 where query t may see key s (same segment, s <= t), else -inf.

    A float additive mask isolates examples with both the `sdpa` and `eager` attention kernels (a
    bool 4D mask is silently ignored by `eager`). Padding rows see only themselves, so no row is
    all -inf (which would give NaN).
    """
    _, length = segment_ids.shape
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal & (segment_ids[:, :, None] > 0)) | torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, T, T)


def padding_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """Share of the batch's positions that are padding (compute spent on nothing)."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / mask.numel()
