"""The running batch of a continuous-batching server: sequences join and leave between decode steps.

One KV cache holds every running row, left-padded to a common length (a `DynamicCache`).
A request that joins is prefilled on its own forward pass (its rows through their adapters),
and its cache rows are padded and concatenated onto the running ones; a finished or cancelled
row is dropped and leading columns that only hold padding are trimmed. Each step then feeds
every row's last token in one forward pass: the base and every routable adapter share it.

Example:
    >>> seq = Sequence(prompt_ids=[1, 2, 3], adapter=None, params=SamplingParams(max_tokens=8, temperature=0))
    >>> batch = RunningBatch(model, pad_id=2, eos_ids={2}, decode=tokenizer.decode)
    >>> batch.join([seq]); while batch.seqs: batch.step()
    >>> seq.text, seq.finish_reason
"""

from __future__ import annotations

import inspect
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence as Seq

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..adapters import AdaptedModel
from ..generate import left_pad
from .routing import RowRouting
from .sampling import SamplingParams, TokenLogprob, choose_token, process_logits, prompt_logprobs, token_logprob


@dataclass
class Event:
    """What a sequence reports as it decodes: new text (and its tokens' log-probs), then one final event."""

    text: str = ""
    finish_reason: str | None = None
    """stop | length | None while running."""
    error: tuple[int, str] | None = None
    """(HTTP status, message) when the sequence failed."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Log-probs of the tokens generated since the previous event (when the request asked for them)."""


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
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Per generated token, when params.logprobs is set."""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """Per prompt token (the first None), when params.prompt_logprobs is set."""
    cumulative_logprob: float = 0.0
    """Sum of the generated tokens' log-probs (best_of ranks by it)."""
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    reported: int = 0
    """Generated tokens whose log-probs went out in an event."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def fail(self, status: int, message: str) -> None:
        self.finish_reason = "error"
        self.on_event(Event(error=(status, message)))

    def stop_ids(self, eos_ids: set[int]) -> set[int]:
        """Tokens that end this answer (EOS unless ignored, plus the request's stop_token_ids)."""
        return (set() if self.params.ignore_eos else set(eos_ids)) | set(self.params.stop_token_ids)

    def push(self, token: int, logprob: TokenLogprob, decode: Callable[[list[int]], str], eos_ids: set[int]) -> None:
        """Take the next token; emit the text that can no longer change; finish on EOS, stop or length."""
        if self.cancelled.is_set():
            self.finish_reason = "cancelled"
            return
        self.first_token_at = self.first_token_at or time.monotonic()
        self.cumulative_logprob += logprob.logprob
        ending = len(self.tokens) >= self.params.min_tokens
        if ending and token in self.stop_ids(eos_ids):
            return self._finish("stop")
        self.tokens.append(token)
        if self.params.logprobs is not None:
            self.logprobs.append(logprob)
        self.text = decode(self.tokens)
        cut = min((i for i in (self.text.find(s) for s in self.params.stop) if i >= 0), default=-1) if ending else -1
        if cut >= 0:
            self.text = self.text[:cut]
            return self._finish("stop")
        if len(self.tokens) >= self.params.max_tokens:
            return self._finish("length")
        self._emit(safe_end(self.text, self.params.stop))

    def _emit(self, end: int) -> None:
        if end > self.emitted:
            self.on_event(Event(text=self.text[self.emitted : end], logprobs=self._new_logprobs()))
            self.emitted = end

    def _new_logprobs(self) -> list[TokenLogprob]:
        new, self.reported = self.logprobs[self.reported :], len(self.logprobs)
        return new

    def _finish(self, reason: str) -> None:
        self._emit(len(self.text))
        self.finish_reason = reason
        self.on_event(Event(finish_reason=reason, logprobs=self._new_logprobs()))

    def finish_without_tokens(self) -> None:
        """max_tokens 0 (an echo-only request): done after the prompt."""
        self._finish("length")


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


def supports_joins(cache: Any) -> bool:
    """Rows can be padded and concatenated only in plain (non-sliding, unquantized) dynamic cache layers."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros prepended along `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class RunningBatch:
    """The rows being decoded, their KV cache, attention mask, positions and next input tokens."""

    def __init__(
        self, model: nn.Module, pad_id: int, eos_ids: set[int], decode: Callable[[list[int]], str],
        routing: RowRouting | None = None,
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.decode = decode
        self.routing = routing
        self.device = next(model.parameters()).device
        self.extra = _forward_kwargs(model)
        self.seqs: list[Sequence] = []
        self.group: Any = None
        """The scheduler group every row belongs to (rows of one group can share a step)."""
        self.cache: Any = None
        self.joinable = True
        """False when the model's cache layers cannot be padded and concatenated (sliding windows): no joins then."""
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, T) 1 = real token
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) position of the next input
        self.next_tokens = torch.zeros(0, dtype=torch.long)  # (B,) the token each row feeds next

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def cache_length(self) -> int:
        return int(self.mask.shape[1])

    def remaining(self) -> int:
        """Most tokens any row may still add to the cache."""
        return max((s.params.max_tokens - len(s.tokens) for s in self.seqs), default=0)

    def footprint(self, extra: Seq[Sequence] = ()) -> int:
        """Cache slots (rows x padded length) this batch may reach, with `extra` rows joined: the KV budget's measure."""
        rows = len(self.seqs) + len(extra)
        length = max([self.cache_length, *(len(s.prompt_ids) for s in extra)])
        remaining = max([self.remaining(), *(s.params.max_tokens for s in extra)])
        return rows * (length + remaining)

    # -- joining ---------------------------------------------------------------------------------
    @torch.no_grad()
    def join(self, seqs: Seq[Sequence]) -> None:
        """Prefill `seqs` and add the unfinished ones to the batch (echo rows are prefilled one by one, with all logits)."""
        plain = [s for s in seqs if s.params.prompt_logprobs is None]
        groups = ([plain] if plain else []) + [[s] for s in seqs if s.params.prompt_logprobs is not None]
        for group in groups:
            self._prefill(group)

    def _prefill(self, seqs: list[Sequence]) -> None:
        ids, mask = left_pad([s.prompt_ids for s in seqs], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding must not shift positions
        echo = seqs[0].params.prompt_logprobs is not None
        extra = {k: v for k, v in self.extra.items() if not echo}
        self._route([s.adapter for s in seqs])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        if echo:
            seq = seqs[0]
            seq.prompt_logprobs = prompt_logprobs(out.logits[0], seq.prompt_ids, seq.params.prompt_logprobs or 0)
        tokens = self._pick(out.logits[:, -1, :], seqs)
        self._merge(seqs, out.past_key_values, mask, positions[:, -1] + 1, tokens)

    def _merge(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add the prefilled rows that are still running to the batch, padding the shorter side on the left."""
        keep = [i for i, s in enumerate(seqs) if not s.done]
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        if len(keep) < len(seqs):
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], tokens[index.cpu()]
        if self.cache is None:
            self.cache, self.mask, self.positions, self.next_tokens = cache, mask, positions, tokens
            self.joinable = supports_joins(cache)
        else:
            length = max(self.cache_length, int(mask.shape[1]))
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)])
                mine.values = torch.cat([_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)])
            self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(mask, length, 1)])
            self.positions = torch.cat([self.positions, positions])
            self.next_tokens = torch.cat([self.next_tokens, tokens])
        self.seqs += [seqs[i] for i in keep]

    # -- stepping --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One forward pass for every row: each takes its next token; returns the rows that left (finished or cancelled)."""
        self._route([s.adapter for s in self.seqs])
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], dim=1)
        out = self.model(
            input_ids=self.next_tokens[:, None].to(self.device), attention_mask=self.mask,
            position_ids=self.positions[:, None], past_key_values=self.cache, use_cache=True, **self.extra,
        )
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        self.next_tokens = self._pick(out.logits[:, -1, :], self.seqs)
        return self.retire()

    def _pick(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """(B, V) raw logits -> (B,) next tokens, each row processed and sampled with its own settings; pushes them."""
        logits = logits.float()
        chosen = logits.argmax(-1).cpu()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, seq in enumerate(seqs):
            params = seq.params
            if params.max_tokens == 0:
                seq.finish_without_tokens()
                continue
            if not params.greedy and seq.generator is None:
                seed = params.seed if params.seed is not None else random.getrandbits(63)
                seq.generator = torch.Generator().manual_seed(seed)
            raw = logits[row]
            processed = process_logits(raw, params, seq.prompt_ids, seq.tokens, seq.stop_ids(self.eos_ids))
            if processed is not raw or not params.greedy:
                chosen[row] = choose_token(processed, params, seq.generator)
            token = int(chosen[row])
            seq.push(token, token_logprob(logprobs[row], token, params.logprobs or 0), self.decode, self.eos_ids)
        return chosen

    def retire(self) -> list[Sequence]:
        """Drop finished and cancelled rows (returned), and the leading cache columns only padding still fills."""
        keep = [i for i, s in enumerate(self.seqs) if not s.done and not s.cancelled.is_set()]
        left = [s for i, s in enumerate(self.seqs) if i not in keep]
        if not left:
            return left
        if not keep:
            self.clear()
            return left
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.next_tokens = self.mask[index], self.positions[index], self.next_tokens[index.cpu()]
        self.seqs = [self.seqs[i] for i in keep]
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]
        return left

    def clear(self) -> None:
        """Forget every row (and stop routing, so the model answers plain forwards again)."""
        self._route(None)
        self.seqs, self.cache, self.group = [], None, None
        self.mask = self.mask[:0, :0]
        self.positions, self.next_tokens = self.positions[:0], self.next_tokens[:0]

    def _route(self, rows: list[str | None] | None) -> None:
        if self.routing is not None:
            self.routing.set_rows(rows)


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Ask for the last position's logits only, where the model supports it (saves the vocab matmul)."""
    inner = model.model if isinstance(model, AdaptedModel) else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}
