"""Request bodies of the OpenAI-compatible and admin endpoints (pydantic), and their sampling settings.

Unknown fields are ignored (clients send many); known OpenAI features this server does not
implement (n > 1, logprobs, echo, penalties, tools...) are refused by name instead of being
silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import PeftkitError
from .decode import SamplingParams

MAX_STOP = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    """The base model's served name, or an adapter's name."""
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    """vLLM's extension: generate exactly max_tokens tokens (for benchmarks)."""

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send several requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Union[str, list[str], None]) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > 256 for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings of up to 256 characters")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> "_GenerationRequest":
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def sampling(self, default_max_tokens: int, max_tokens_limit: int) -> SamplingParams:
        """The decode settings, with `max_tokens` checked against the server's limit."""
        max_tokens = self.max_tokens if self.max_tokens is not None else min(default_max_tokens, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise PeftkitError(f"max_tokens {max_tokens} is above this server's limit of {max_tokens_limit}")
        stop = tuple(self.stop) if isinstance(self.stop, list) else ()
        return SamplingParams(max_tokens, self.temperature, self.top_p, stop, self.seed, self.ignore_eos)


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str]]
    """Text, or a list of texts (one choice each); for an adapter it fills the adapter's template."""
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _unsupported_completion(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        if self.echo or self.logprobs is not None or (self.best_of or 1) > 1 or self.suffix:
            raise ValueError("echo, logprobs, best_of and suffix are not supported")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    """A string, or a list of text parts (images and other parts are not supported)."""

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    """OpenAI's newer name for max_tokens."""
    logprobs: Optional[bool] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _unsupported_chat(self) -> "ChatRequest":
        if self.logprobs or self.tools:
            raise ValueError("logprobs and tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)
    """A folder under the server's adapter root (relative to it, or absolute inside it)."""


class CombineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    adapters: list[str] = Field(min_length=1, max_length=16)
    weights: list[float] = Field(min_length=1, max_length=16)
    how: Literal["linear", "cat", "svd"] = "svd"
    rank: Optional[int] = Field(None, ge=1, le=1024)
