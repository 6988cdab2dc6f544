"""Batched generation through THE formatting function (left padding, stop at EOS), and THE decoder
of answers to rows: the samples printed after training and `peftkit eval` both call `answer_rows`,
so the same settings give the same answers.

Example:
    >>> texts = generate_texts(model, tokenizer, fmt, [{"abstract": "..."}], max_new_tokens=60)
    >>> answers = answer_rows(model, tokenizer, fmt, rows, Decoding(repetition_penalty=1.1))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

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
    repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
) -> list[list[int]]:
    """New token ids per sequence, EOS and after removed. `repetition_penalty` > 1 divides the logit of every
    token already in the sequence (prompt included) by it; `no_repeat_ngram_size` N > 0 forbids any N-gram
    twice (both transformers' logits processors)."""
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
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


@dataclass
class Decoding:
    """How answers are decoded, wherever rows are answered (samples after training, `peftkit eval`)."""

    max_new_tokens: int = 60
    """Most new tokens per answer (generation stops at EOS)."""
    batch_size: int = 8
    """Prompts generated together (rows are batched by prompt length)."""
    num_beams: int = 1
    """Beam search with this many beams (1: greedy)."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (with do_sample)."""
    top_p: float = 1.0
    """Nucleus sampling mass (with do_sample)."""
    repetition_penalty: float = 1.0
    """Divide the logits of tokens already present by this (1.0: off)."""
    no_repeat_ngram_size: int = 0
    """Never repeat an N-gram (0: off)."""
    seed: int = 0
    """Seeds sampling (and, in evaluation, the bootstrap intervals)."""

    @classmethod
    def from_config(cls, generate: Any) -> "Decoding":
        """The decoding a run's `generate:` section (GenerateConfig) asks for; batching and seed as evaluation's."""
        return cls(max_new_tokens=generate.max_new_tokens, do_sample=generate.do_sample, temperature=generate.temperature,
                   top_p=generate.top_p, repetition_penalty=generate.repetition_penalty,
                   no_repeat_ngram_size=generate.no_repeat_ngram_size)

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments `generate_texts` takes (everything but the batching and the seed)."""
        kwargs = asdict(self)
        del kwargs["batch_size"], kwargs["seed"]
        return kwargs

    def describe(self) -> str:
        """`greedy, at most 60 new tokens, repetition penalty 1.1`: what a person needs to reproduce answers."""
        how = "sampling" if self.do_sample else (f"beam search ({self.num_beams} beams)" if self.num_beams > 1 else "greedy")
        if self.do_sample:
            how += f" (temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed})"
        parts = [how, f"at most {self.max_new_tokens} new tokens"]
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition penalty {self.repetition_penalty:g}")
        if self.no_repeat_ngram_size:
            parts.append(f"no repeated {self.no_repeat_ngram_size}-grams")
        return ", ".join(parts)


def answer_rows(
    model: nn.Module, tokenizer: Any, fmt: PromptFormat, rows: Sequence[Mapping[str, Any]], decoding: Decoding,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """An answer per row, in row order. Rows are batched by prompt length (shortest first), so batches pad
    little and the same rows in the same batch give the same answers wherever this runs."""
    order = sorted(range(len(rows)), key=lambda i: len(fmt.render(rows[i])))
    torch.manual_seed(decoding.seed)
    outputs = [""] * len(rows)
    for start in range(0, len(order), decoding.batch_size):
        chunk = order[start : start + decoding.batch_size]
        texts = generate_texts(model, tokenizer, fmt, [rows[i] for i in chunk], batch_size=len(chunk), **decoding.generate_kwargs())
        for i, text in zip(chunk, texts):
            outputs[i] = text
        if advance is not None:
            advance(len(chunk))
    return outputs


def weights_label(model: nn.Module) -> str:
    """The precision the frozen weights compute in (`fp32`, `bf16`, `fp16`, `quantized`): answers depend on it."""
    frozen = [p for p in model.parameters() if not p.requires_grad] or list(model.parameters())
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(frozen[0].dtype, "quantized" if not frozen[0].dtype.is_floating_point else str(frozen[0].dtype))
