"""From decode events to OpenAI response objects: whole answers, or server-sent event chunks.

The decode thread calls each sequence's `on_event`; `EventStream` hands those events to the
request's asyncio task through the event loop.

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
from typing import Any, AsyncIterator, Literal

from .decode import Event, Sequence
from .errors import ApiError, error_body

Kind = Literal["completion", "chat"]


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
class Answer:
    text: str = ""
    finish_reason: str | None = None


def usage(seqs: list[Sequence]) -> dict[str, int]:
    prompt = sum(len(s.prompt_ids) for s in seqs)
    completion = sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def header(kind: Kind, model: str, chunk: bool) -> dict[str, Any]:
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    obj = "text_completion" if kind == "completion" else ("chat.completion.chunk" if chunk else "chat.completion")
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model}


async def collect(stream: EventStream) -> list[Answer]:
    """Wait for every sequence; the first failure becomes the request's error."""
    answers = [Answer() for _ in stream.seqs]
    async for index, event in stream.events():
        if event.error is not None:
            raise ApiError(*event.error)
        answers[index].text += event.text
        answers[index].finish_reason = event.finish_reason or answers[index].finish_reason
    return answers


def whole_response(kind: Kind, model: str, seqs: list[Sequence], answers: list[Answer]) -> dict[str, Any]:
    if kind == "completion":
        choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None} for i, a in enumerate(answers)]
    else:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": a.text}, "finish_reason": a.finish_reason, "logprobs": None}
            for i, a in enumerate(answers)
        ]
    return {**header(kind, model, chunk=False), "choices": choices, "usage": usage(seqs)}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunk_choice(kind: Kind, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
    if kind == "completion":
        return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


async def sse_chunks(kind: Kind, model: str, stream: EventStream, include_usage: bool) -> AsyncIterator[str]:
    """`data: {chunk}` lines as tokens arrive, a final chunk per choice, usage if asked, then `data: [DONE]`."""
    base = header(kind, model, chunk=True)
    if kind == "chat":
        for index in range(len(stream.seqs)):
            yield _sse({**base, "choices": [_chunk_choice(kind, index, "", None, role=True)]})
    async for index, event in stream.events():
        if event.error is not None:
            yield _sse(error_body(*event.error))
            break
        if event.text:
            yield _sse({**base, "choices": [_chunk_choice(kind, index, event.text, None)]})
        if event.finish_reason is not None:
            yield _sse({**base, "choices": [_chunk_choice(kind, index, None if kind == "chat" else "", event.finish_reason)]})
    else:
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage(stream.seqs)})
    yield "data: [DONE]\n\n"
