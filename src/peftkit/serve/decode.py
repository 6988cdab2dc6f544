"""The KV-cache decode loop for one batch: prefill, then one token per row per step.

Every row has its own adapter, sampling settings, stop strings and length limit. Finished rows
leave the batch (their cache rows are dropped), so short answers stop costing compute.

Example:
    >>> seq = Sequence(prompt_ids=[1, 2, 3], adapter=None, params=SamplingParams(max_tokens=8, temperature=0))
    >>> decode_batch(model, tokenizer, [seq])
    >>> seq.text, seq.finish_reason
"""

from __future__ import annotations

import inspect
import random
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence as Seq

import torch
from torch import nn

from ..adapters import AdaptedModel
from ..generate import left_pad
from .routing import RowRouting


GREEDY_BELOW = 1e-4
"""Temperatures below this decode greedily."""


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int = 16
    temperature: float = 1.0
    """Below GREEDY_BELOW (e.g. 0) means greedy (argmax)."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    """Keep going past EOS until max_tokens (vLLM's extension; benchmarks use it)."""


@dataclass
class Event:
    """What a sequence reports as it decodes: new text, then one final event."""

    text: str = ""
    finish_reason: str | None = None
    """stop | length | None while running."""
    error: tuple[int, str] | None = None
    """(HTTP status, message) when the sequence failed."""


@dataclass
class Sequence:
    """One prompt being answered; `on_event` is called (from the decode thread) with each Event."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def fail(self, status: int, message: str) -> None:
        self.finish_reason = "error"
        self.on_event(Event(error=(status, message)))

    def push(self, token: int, decode: Callable[[list[int]], str], eos_ids: set[int]) -> None:
        """Take the next token; emit the text that can no longer change; finish on EOS, stop or length."""
        if self.cancelled.is_set():
            self.finish_reason = "cancelled"
            return
        if token in eos_ids and not self.params.ignore_eos:
            return self._finish("stop")
        self.tokens.append(token)
        self.text = decode(self.tokens)
        cut = min((i for i in (self.text.find(s) for s in self.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._finish("stop")
        if len(self.tokens) >= self.params.max_tokens:
            return self._finish("length")
        self._emit(safe_end(self.text, self.params.stop))

    def _emit(self, end: int) -> None:
        if end > self.emitted:
            self.on_event(Event(text=self.text[self.emitted : end]))
            self.emitted = end

    def _finish(self, reason: str) -> None:
        self._emit(len(self.text))
        self.finish_reason = reason
        self.on_event(Event(finish_reason=reason))


def safe_end(text: str, stop: Seq[str]) -> int:
    """How much of `text` can be streamed: hold back a possible stop-string start and a split UTF-8 char."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


def pick_tokens(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """(B, V) float logits -> (B,) next tokens: argmax for temperature ~0, else top-p sampling per row."""
    chosen = logits.argmax(-1).cpu()
    for row, seq in enumerate(seqs):
        if seq.params.temperature < GREEDY_BELOW:  # dividing by a tinier temperature overflows to inf
            continue
        if seq.generator is None:
            seed = seq.params.seed if seq.params.seed is not None else random.getrandbits(63)
            seq.generator = torch.Generator().manual_seed(seed)
        probs = torch.softmax(logits[row] / seq.params.temperature, dim=-1)
        if seq.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > seq.params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[row] = torch.multinomial(probs.cpu(), 1, generator=seq.generator).item()
    return chosen


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Ask for the last position's logits only, where the model supports it (saves the vocab matmul)."""
    inner = model.model if isinstance(model, AdaptedModel) else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


@torch.no_grad()
def decode_batch(
    model: nn.Module, seqs: Seq[Sequence], pad_id: int, eos_ids: set[int], decode: Callable[[list[int]], str],
    routing: RowRouting | None = None,
) -> None:
    """Run every sequence to its end; rows go through their own adapters when `routing` is given."""
    device = next(model.parameters()).device
    ids, mask = left_pad([s.prompt_ids for s in seqs], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding must not shift positions
    active = list(seqs)
    extra = _forward_kwargs(model)
    with routing.route([s.adapter for s in seqs]) if routing is not None else nullcontext():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        cache = out.past_key_values
        while True:
            tokens = pick_tokens(out.logits[:, -1, :].float(), active)  # (B,)
            for seq, token in zip(active, tokens.tolist()):
                seq.push(token, decode, eos_ids)
            keep = [i for i, s in enumerate(active) if not s.done]
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep)
                cache.batch_select_indices(index.to(device))
                mask, positions, tokens = mask[index.to(device)], positions[index.to(device)], tokens[index]
                active = [active[i] for i in keep]
                if routing is not None:
                    routing.keep(keep)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=tokens[:, None].to(device), attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, **extra,
            )
