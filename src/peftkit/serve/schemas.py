"""Request bodies of the OpenAI-compatible (vLLM-shaped) and admin endpoints (pydantic), and their sampling settings.

Unknown fields are ignored (clients send many). Fields this server knows but does not implement
(tools, guided decoding, beam search, suffix, ...) are refused by name, with `param` set to the
field, when they are sent with anything but their neutral value: never silently dropped.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ApiError
from .sampling import SamplingParams

MAX_STOP = 64
"""Most stop strings (and stop token ids) in one request (vLLM sets no limit; lm-eval tasks use up to ~10)."""
MAX_LOGPROBS = 20
"""Most alternatives per token for `logprobs` / `top_logprobs` (vLLM's default max_logprobs)."""

NEUTRAL: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "early_stopping": (False,),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "guided_decoding_backend": (),
    "guided_whitespace_pattern": (), "structured_outputs": (), "allowed_token_ids": (), "bad_words": ((),),
    "truncate_prompt_tokens": (), "prompt_logprobs": (), "return_tokens_as_token_ids": (False,),
    "include_stop_str_in_output": (False,), "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
    "logits_processors": (), "prompt_embeds": (), "priority": (0,), "return_token_ids": (False,),
    "vllm_xargs": (), "kv_transfer_params": (), "mm_processor_kwargs": (), "lora_request": (),
}
"""vLLM / OpenAI fields this server does not implement, with the values that mean 'off' (None always does)."""
NEUTRAL_COMPLETION = {**NEUTRAL, "suffix": ("",)}
NEUTRAL_CHAT = {
    **NEUTRAL, "tools": ((),), "tool_choice": ("none",), "functions": ((),), "function_call": ("none",),
    "parallel_tool_calls": (False, True), "audio": (), "modalities": (("text",),), "prediction": (),
    "web_search_options": (), "documents": (), "chat_template": (), "chat_template_kwargs": (),
    "continue_final_message": (False,), "add_generation_prompt": (True,), "echo": (False,),
}


def refuse_unsupported(data: Any, neutral: dict[str, tuple[Any, ...]]) -> None:
    """400 naming the first field sent with a value this server cannot honour."""
    if not isinstance(data, dict):
        return
    for field, values in neutral.items():
        value = data.get(field)
        if value is None or value in values or (isinstance(value, list) and tuple(value) in values):
            continue
        raise ApiError(400, f"`{field}` is not supported by this server; remove it from the request", param=field)


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
    top_k: int = Field(0, ge=-1)
    """vLLM: sample among the k most likely tokens (0 or -1: all)."""
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1)
    """Choices per prompt (at most the server's --max-choices)."""
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = Field(None, max_length=MAX_STOP)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=64)
    """transformers' option: never repeat an n-gram of this size (0: off)."""
    min_tokens: int = Field(0, ge=0)
    logit_bias: Optional[dict[str, float]] = None
    """Token id (as a string) -> bias in [-100, 100] added to its logit."""
    user: Optional[str] = None
    ignore_eos: bool = False
    """vLLM's extension: generate exactly max_tokens tokens (for benchmarks)."""
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = NEUTRAL
    """Fields refused by name unless neutral (per endpoint)."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        refuse_unsupported(data, cls.unsupported)
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Union[str, list[str], None]) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > 256 for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings of up to 256 characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {key[:40]!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100], not {value}")
        return bias

    def sampling(self, default_max_tokens: int, max_tokens_limit: int, vocab_size: int) -> SamplingParams:
        """The decode settings, with `max_tokens` and token ids checked against the server and the vocabulary."""
        max_tokens = self.max_tokens if self.max_tokens is not None else min(default_max_tokens, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {max_tokens_limit}", "max_tokens")
        if self.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens {self.min_tokens} is above max_tokens {max_tokens}", "min_tokens")
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        for field, ids in (("logit_bias", bias), ("stop_token_ids", self.stop_token_ids or [])):
            outside = next((t for t in ids if not 0 <= t < vocab_size), None)
            if outside is not None:
                raise ApiError(400, f"{field}: token id {outside} is outside the vocabulary (0 to {vocab_size - 1})", field)
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=tuple(self.stop or ()),
            seed=self.seed, ignore_eos=self.ignore_eos, top_k=max(self.top_k, 0), min_p=self.min_p,
            stop_token_ids=tuple(self.stop_token_ids or ()), min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size, logit_bias=bias,
            logprobs=self.token_logprobs(),
        )

    def token_logprobs(self) -> int | None:
        """Alternatives per generated token the response reports (None: no log-probs)."""
        return None

    def choices(self, max_choices: int) -> int:
        """Sequences to generate per prompt (n, or best_of), checked against the server's limit."""
        if self.n > max_choices:
            raise ApiError(400, f"n {self.n} is above this server's limit of {max_choices} choices per prompt", "n")
        return self.n


PromptInput = Union[str, list[str], list[int], list[list[int]]]
"""Text, texts, token ids, or lists of token ids (OpenAI's `prompt` and `input`)."""


def as_inputs(value: PromptInput) -> list[str | list[int]]:
    """Each input of a `prompt` / `input` field: a text or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


class CompletionRequest(_GenerationRequest):
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = NEUTRAL_COMPLETION
    prompt: PromptInput
    """Text, a list of texts, a list of token ids, or a list of such lists (one choice each; ids are used as they are)."""
    max_tokens: Optional[int] = Field(None, ge=0)
    """0 with `echo`: only the prompt's log-probs."""
    echo: bool = False
    """Return the prompt before the completion (and its log-probs with `logprobs`; the first token's is null)."""
    logprobs: Optional[int] = Field(None, ge=0)
    """Log-probs of each token and this many most likely alternatives."""
    best_of: Optional[int] = Field(None, ge=1)
    """Generate this many per prompt and return the n with the highest log-prob."""

    @model_validator(mode="after")
    def _checks(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ApiError(400, "prompt is an empty list; send text or token ids", "prompt")
        if isinstance(self.prompt, list) and any(isinstance(p, list) and not p for p in self.prompt):
            raise ApiError(400, "prompt holds an empty list of token ids", "prompt")
        if self.logprobs is not None and self.logprobs > MAX_LOGPROBS:
            raise ApiError(400, f"logprobs {self.logprobs} is above the limit of {MAX_LOGPROBS} alternatives per token", "logprobs")
        if self.echo and self.stream:
            raise ApiError(400, "echo cannot be combined with stream; send echo without stream", "echo")
        if self.best_of is not None and self.best_of < self.n:
            raise ApiError(400, f"best_of {self.best_of} must be at least n ({self.n})", "best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ApiError(400, "best_of above n cannot be streamed (the best are known only at the end)", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens 0 returns nothing without echo; ask for at least 1 token, or set echo", "max_tokens")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text or a list of token ids."""
        return as_inputs(self.prompt)

    def token_logprobs(self) -> int | None:
        return self.logprobs

    def choices(self, max_choices: int) -> int:
        n = super().choices(max_choices)
        if (self.best_of or n) > max_choices:
            raise ApiError(400, f"best_of {self.best_of} is above this server's limit of {max_choices}", "best_of")
        return self.best_of or n


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
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = NEUTRAL_CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    """OpenAI's newer name for max_tokens."""
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0)
    response_format: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _checks(self) -> "ChatRequest":
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ApiError(400, "response_format other than text is not supported", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if self.top_logprobs is not None and self.top_logprobs > MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs {self.top_logprobs} is above the limit of {MAX_LOGPROBS}", "top_logprobs")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt or chat messages; `model` optional (the base)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, max_length=256)
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "send exactly one of prompt or messages", "prompt")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = Field(None, max_length=256)
    tokens: list[int] = Field(max_length=1 << 16)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)
    """A folder under the server's adapter root (relative to it, or absolute inside it)."""


class VllmLoadRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)


class VllmUnloadRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=64)


class CombineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    adapters: list[str] = Field(min_length=1, max_length=16)
    weights: list[float] = Field(min_length=1, max_length=16)
    how: Literal["linear", "cat", "svd"] = "svd"
    rank: Optional[int] = Field(None, ge=1, le=1024)

