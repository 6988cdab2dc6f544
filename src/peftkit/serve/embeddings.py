"""Serving embedding adapters (`task: embedding`, trained on an encoder such as all-MiniLM-L6-v2): /v1/embeddings.

`peftkit serve --adapter NAME=runs/<embedding run>/adapter` notices the task in the adapter's
peftkit.json and serves this app instead of the generation one: the encoder base (by its served
name) and each embedding adapter answer OpenAI's `/v1/embeddings`, pooled and normalised exactly as
training and `peftkit eval` embed (`tasks.embedding.embed`, the run's pooling and max_length).

Example:
    >>> service = EmbeddingService.from_paths({"emb": "runs/emb/adapter"})
    >>> app = create_embedding_app(service)
    >>> # POST /v1/embeddings {"model": "emb", "input": ["a query", "a passage"]}
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..adapters import AdaptedModel, read_sidecar
from ..artifacts import load_artifact
from ..errors import AdapterError
from ..tasks.embedding import embed, tokenize
from .engine import UnknownModel, served_name
from .errors import ApiError, install_error_handlers, parse_body, read_json
from .schemas import PromptInput, as_inputs
from .security import check_adapter_files, key_matches
from .settings import ServeSettings


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request (vLLM's shape)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


def is_embedding_adapter(path: str | Path) -> bool:
    """Was this adapter trained with `task: embedding`? (its peftkit.json says so)"""
    return read_sidecar(path).get("task") == "embedding"


class EmbeddingService:
    """An encoder base with its embedding adapters, each with the pooling and length it was trained with."""

    def __init__(self, adapted: AdaptedModel, tokenizer: Any, base_name: str, settings: ServeSettings | None = None) -> None:
        self.adapted = adapted.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.settings = settings or ServeSettings()
        self.adapters: dict[str, tuple[str, int]] = {}
        """Adapter name -> (pooling, max_length) from its run config."""
        self._lock = threading.Lock()

    @classmethod
    def from_paths(cls, adapters: Mapping[str, str | Path], model: str | None = None, settings: ServeSettings | None = None,
                   device: str = "auto", precision: str = "fp32", base_name: str | None = None) -> "EmbeddingService":
        """Load the first adapter onto its recorded base encoder (or `model`), then the others onto it."""
        names = list(adapters)
        first = Path(adapters[names[0]])
        check_adapter_files(first)
        artifact = load_artifact(first, model, device=device, precision=precision, name=names[0])
        if artifact.adapted is None:
            raise AdapterError(f"{first}: not an adapter folder")
        origin = artifact.meta.get("base_model") or {}
        base = model or origin.get("builtin") or origin.get("name_or_path") or "base"
        service = cls(artifact.adapted, artifact.tokenizer, base_name or served_name(str(base)), settings)
        service.adapters[names[0]] = _pooling(artifact.meta)
        for name in names[1:]:
            service.add(name, Path(adapters[name]))
        service.adapted.set_adapter(None)
        return service

    def add(self, name: str, folder: Path) -> None:
        if not is_embedding_adapter(folder):
            raise AdapterError(f"{folder}: not an embedding adapter; one server serves embedding adapters or generation, not both")
        check_adapter_files(folder)
        with self._lock:
            meta = self.adapted.load_adapter(folder, name=name)
            self.adapters[name] = _pooling(meta)

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def resolve(self, model: str) -> str | None:
        if model in self.adapters:
            return model
        if model == self.base_name:
            return None
        raise UnknownModel(f"model {model!r} is not served; available: {', '.join(self.model_names())}")

    @torch.no_grad()
    def embed(self, model: str, inputs: list[str | list[int]]) -> tuple[torch.Tensor, int]:
        """(N, H) unit vectors of `inputs` (texts or token ids) through `model`, and the tokens they took."""
        adapter = self.resolve(model)
        pooling, max_length = self.adapters[adapter] if adapter else next(iter(self.adapters.values()), ("mean", 256))
        device = next(self.adapted.parameters()).device
        with self._lock:
            self.adapted.set_adapter(adapter)
            try:
                vectors, tokens = [], 0
                for item in inputs:
                    batch = _token_batch(item, max_length, device) if isinstance(item, list) else tokenize(
                        self.tokenizer, [item], max_length, device)
                    vectors.append(embed(self.adapted, batch, pooling).cpu())
                    tokens += int(batch["attention_mask"].sum())
            finally:
                self.adapted.set_adapter(None)
        return torch.cat(vectors), tokens


def _pooling(meta: Mapping[str, Any]) -> tuple[str, int]:
    run = meta.get("run_config") or {}
    return str((run.get("embedding") or {}).get("pooling", "mean")), int((run.get("data") or {}).get("max_length", 256))


def _token_batch(ids: list[int], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = ids[:max_length]
    return {"input_ids": torch.tensor([ids], device=device), "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device)}


def create_embedding_app(service: EmbeddingService) -> FastAPI:
    """/health, /v1/models and /v1/embeddings for an embedding service (the API key as on the generation server)."""

    app = FastAPI(title="peftkit serve (embeddings)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = service
    install_error_handlers(app)

    def require_key(request: Request) -> None:
        key = service.settings.api_key
        if key is not None and not key_matches(request.headers.get("authorization"), key):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": service.model_names()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        require_key(request)
        cards = [{"id": n, "object": "model", "owned_by": "peftkit", "parent": None if n == service.base_name else service.base_name}
                 for n in service.model_names()]
        return {"object": "list", "data": cards}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        require_key(request)
        body = parse_body(EmbeddingRequest, await read_json(request, service.settings.max_body_bytes))
        if body.dimensions is not None:
            raise ApiError(400, "`dimensions` is not supported: the adapter's vectors have a fixed size", param="dimensions")
        inputs = as_inputs(body.input)
        if not inputs or any(not item for item in inputs):
            raise ApiError(400, "input is empty; send text or token ids", param="input")
        if len(inputs) > service.settings.max_prompts_per_request * 8:
            raise ApiError(400, f"{len(inputs)} inputs in one request; the limit is {service.settings.max_prompts_per_request * 8}", "input")
        vocab = service.adapted.model.get_input_embeddings().weight.shape[0]
        if any(isinstance(i, list) and not all(0 <= t < vocab for t in i) for i in inputs):
            raise ApiError(400, f"input holds a token id outside the vocabulary (0 to {vocab - 1})", param="input")
        vectors, tokens = await run_in_threadpool(service.embed, body.model, inputs)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


def _encode(vector: torch.Tensor, encoding: str) -> list[float] | str:
    """A float list, or OpenAI's base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()
