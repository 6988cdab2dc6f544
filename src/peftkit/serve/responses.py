"""From decode events to OpenAI response objects: whole answers, or server-sent event chunks, with log-probs.

The decode thread calls each sequence's `on_event`; `EventStream` hands those events to the
request's asyncio task through the event loop. Log-probs come in the two OpenAI shapes:
completions' `{tokens, token_logprobs, top_logprobs, text_offset}` (with `echo`, the prompt's
tokens first, the very first one null) and chat's `{content: [{token, logprob, bytes, top_logprobs}]}`.

Example:
    >>> stream = EventStream(seqs)
    >>> async for index, event in stream.events(): ...
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable, Literal

from .decode import Event, Sequence
from .errors import ApiError, error_body
from .sampling import TokenLogprob

Kind = Literal["completion", "chat"]
TokenText = Callable[[int], str]
"""The text of one token id (for log-prob entries)."""


class EventStream:
    """The events of a request's sequences, in arrival order, as (sequence index, Event)."""

    def __init__(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        for index, seq in enumerate(seqs):
            seq.on_event = partial(self._put, index)

    def _put(self, index: int, event: Event) -> None:  # runs on the decode thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        open_ = len(self.seqs)
        while open_:
            index, event = await self._queue.get()
            if event.finish_reason is not None or event.error is not None:
                open_ -= 1
            yield index, event

    def cancel(self) -> None:
        """The client is gone: finished or not, its sequences stop at the next step."""
        for seq in self.seqs:
            seq.cancelled.set()


@dataclass
class PromptChoices:
    """One prompt of a request and the sequences answering it (n of them, or best_of before selection)."""

    text: str
    """The prompt as echoed: its token ids decoded, as the model saw them ("" without echo)."""
    seqs: list[Sequence]


async def collect(stream: EventStream) -> None:
    """Wait for every sequence to finish; the first failure becomes the request's error."""
    async for _, event in stream.events():
        if event.error is not None:
            raise ApiError(*event.error)


def best(prompt: PromptChoices, n: int) -> list[Sequence]:
    """The n sequences with the highest total log-prob, in generation order (best_of); all of them when n covers them."""
    if len(prompt.seqs) <= n:
        return prompt.seqs
    ranked = sorted(prompt.seqs, key=lambda s: -s.cumulative_logprob)[:n]
    return [s for s in prompt.seqs if any(s is r for r in ranked)]


def usage(prompts: list[PromptChoices]) -> dict[str, int]:
    prompt = sum(len(p.seqs[0].prompt_ids) for p in prompts)
    completion = sum(len(s.tokens) for p in prompts for s in p.seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def header(kind: Kind, model: str, chunk: bool) -> dict[str, Any]:
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    obj = "text_completion" if kind == "completion" else ("chat.completion.chunk" if chunk else "chat.completion")
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model}


# -- log-probs ----------------------------------------------------------------------------------------
def _top(entry: TokenLogprob, token_text: TokenText) -> dict[str, float]:
    """The alternatives and the token itself, by text (vLLM includes the chosen token)."""
    top = {token_text(t): lp for t, lp in entry.top}
    top.setdefault(token_text(entry.token), entry.logprob)
    return top


def completion_logprobs(entries: list[TokenLogprob | None], ids: list[int], token_text: TokenText, offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy shape for tokens `ids` (entries[i] None: no log-prob, the first prompt token)."""
    texts = [token_text(t) for t in ids]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob if e is not None else None for e in entries],
        "top_logprobs": [_top(e, token_text) if e is not None else None for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, log-prob, UTF-8 bytes and the top alternatives."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}


def _choice_logprobs(kind: Kind, seq: Sequence, echo: bool, token_text: TokenText) -> dict[str, Any] | None:
    if seq.params.logprobs is None:
        return None
    if kind == "chat":
        return chat_logprobs(seq.logprobs, token_text)
    entries: list[TokenLogprob | None] = [*seq.prompt_logprobs, *seq.logprobs] if echo else list(seq.logprobs)
    ids = [*seq.prompt_ids, *seq.tokens[: len(seq.logprobs)]] if echo else seq.tokens[: len(seq.logprobs)]
    return completion_logprobs(entries, ids, token_text)


# -- whole responses ----------------------------------------------------------------------------------
def whole_response(
    kind: Kind, model: str, prompts: list[PromptChoices], n: int, echo: bool, token_text: TokenText,
) -> dict[str, Any]:
    """A completion or chat completion: n choices per prompt (choice index = prompt index x n + j)."""
    choices = []
    for i, prompt in enumerate(prompts):
        for j, seq in enumerate(best(prompt, n)):
            logprobs = _choice_logprobs(kind, seq, echo, token_text)
            if kind == "completion":
                text = (prompt.text if echo else "") + seq.text
                choices.append({"index": i * n + j, "text": text, "finish_reason": seq.finish_reason, "logprobs": logprobs})
            else:
                choices.append({"index": i * n + j, "message": {"role": "assistant", "content": seq.text},
                                "finish_reason": seq.finish_reason, "logprobs": logprobs})
    return {**header(kind, model, chunk=False), "choices": choices, "usage": usage(prompts)}


# -- streams ------------------------------------------------------------------------------------------
def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunk_choice(kind: Kind, index: int, text: str | None, finish_reason: str | None, logprobs: Any = None,
                  role: bool = False) -> dict[str, Any]:
    if kind == "completion":
        return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}


def _chunk_logprobs(kind: Kind, seq: Sequence, event: Event, offset: int, token_text: TokenText) -> Any:
    if seq.params.logprobs is None or not event.logprobs:
        return None
    if kind == "chat":
        return chat_logprobs(event.logprobs, token_text)
    return completion_logprobs(list(event.logprobs), [e.token for e in event.logprobs], token_text, offset)


async def sse_chunks(
    kind: Kind, model: str, stream: EventStream, prompts: list[PromptChoices], include_usage: bool, token_text: TokenText,
) -> AsyncIterator[str]:
    """`data: {chunk}` lines as tokens arrive, a final chunk per choice, usage if asked, then `data: [DONE]`."""
    base = header(kind, model, chunk=True)
    offsets = [0] * len(stream.seqs)
    if kind == "chat":
        for index in range(len(stream.seqs)):
            yield _sse({**base, "choices": [_chunk_choice(kind, index, "", None, role=True)]})
    async for index, event in stream.events():
        if event.error is not None:
            yield _sse(error_body(*event.error))
            break
        logprobs = _chunk_logprobs(kind, stream.seqs[index], event, offsets[index], token_text)
        if event.text or logprobs is not None:
            yield _sse({**base, "choices": [_chunk_choice(kind, index, event.text, None, logprobs)]})
            offsets[index] += len(event.text)
        if event.finish_reason is not None:
            yield _sse({**base, "choices": [_chunk_choice(kind, index, None if kind == "chat" else "", event.finish_reason)]})
    else:
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage(prompts)})
    yield "data: [DONE]\n\n"
