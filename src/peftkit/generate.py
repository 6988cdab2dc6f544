"""Batched generation through THE formatting function (left padding, stop at EOS).

Example:
    >>> texts = generate_texts(model, tokenizer, fmt, [{"abstract": "..."}], max_new_tokens=60)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .data.datasets import prompt_ids
from .data.templates import PromptFormat, format_prompt


def encode_prompts(
    tokenizer: Any, fmt: PromptFormat, rows: Sequence[Mapping[str, Any]], seq2seq: bool = False
) -> list[list[int]]:
    """Prompt token ids per row, through the same formatting as training."""
    return [prompt_ids(tokenizer, fmt, format_prompt(tokenizer, fmt, row), seq2seq) for row in rows]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the left so every row's next token is at the end."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def generate_ids(
    model: nn.Module, tokenizer: Any, sequences: Sequence[Sequence[int]], max_new_tokens: int = 60,
    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1,
) -> list[list[int]]:
    """New token ids per sequence, EOS and after removed."""
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **kwargs,
        )
    finally:
        model.train(was_training)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    new = out if seq2seq else out[:, ids.shape[1] :]
    results = []
    for row in new.tolist():
        if seq2seq and row and row[0] == getattr(model.config, "decoder_start_token_id", None):
            row = row[1:]
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        while row and row[-1] == tokenizer.pad_token_id:
            row = row[:-1]
        results.append(row)
    return results


def generate_texts(
    model: nn.Module, tokenizer: Any, fmt: PromptFormat, rows: Sequence[Mapping[str, Any]], max_new_tokens: int = 60,
    batch_size: int = 8, **kwargs: Any,
) -> list[str]:
    """Generate an answer for each row (formatted exactly as in training); greedy by default."""
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    encoded = encode_prompts(tokenizer, fmt, rows, seq2seq)
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        for ids in generate_ids(model, tokenizer, encoded[start : start + batch_size], max_new_tokens, **kwargs):
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts
