"""What a server allows: batching, limits and the security switches, each with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeSettings:
    """Limits and switches of one `peftkit serve` process (every field is a CLI option)."""

    max_batch_size: int = 8
    """Most sequences decoded together in one forward pass."""
    max_wait_ms: float = 10.0
    """Static batching only: how long the first queued request waits for company before its batch starts."""
    batching: str = "continuous"
    """continuous (requests join and leave the running batch between decode steps) or static (a batch runs to its end)."""
    kv_cache_tokens: int = 32768
    """KV-cache budget in token slots (rows x padded length, prompt + max_tokens each); a request that does not fit waits."""
    max_choices: int = 16
    """Largest `n` / `best_of` of one request."""
    max_prompt_tokens: int = 2048
    """Longest prompt (in tokens, after the template) a request may send."""
    max_tokens_limit: int = 512
    """Largest `max_tokens` a request may ask for (also the default for chat requests)."""
    default_max_tokens: int = 16
    """`max_tokens` of a completion request that gives none (OpenAI's default)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 above it)."""
    max_concurrent: int = 64
    """Requests in flight or queued at once (429 above it)."""
    max_prompts_per_request: int = 16
    """Longest list of prompts in one completion request."""
    max_adapters: int = 32
    """Most adapters resident at once: admin loads beyond it are refused; with adapter_dir the least recently used goes."""
    adapter_dir: Path | None = None
    """Every adapter folder under it is served by its folder name, loaded on its first request (LoRAX-style)."""
    drain_seconds: float = 10.0
    """On SIGTERM: how long requests in flight may finish before they are cancelled and the process exits."""
    api_key: str | None = None
    """Bearer key for /v1/* when set; the admin endpoints always need it (disabled without one)."""
    adapter_root: Path | None = None
    """The only folder admin loads may read adapters from (disabled without one)."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_prompt_tokens", "max_tokens_limit", "default_max_tokens", "max_body_bytes",
                     "max_concurrent", "max_prompts_per_request", "max_adapters", "kv_cache_tokens", "max_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.batching not in ("continuous", "static"):
            raise ValueError(f"batching must be continuous or static, not {self.batching!r}")
        if self.drain_seconds < 0:
            raise ValueError("drain_seconds must be >= 0")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None
