"""The HTTP server: OpenAI-compatible endpoints over one base and many adapters, plus admin endpoints.

    GET  /health                      liveness (no key needed)
    GET  /openapi.json                the API's OpenAPI document (no key needed)
    GET  /v1/models                   the base and every adapter, by the name requests use
    POST /v1/completions              `model` picks the base or an adapter; `stream` for SSE
    POST /v1/chat/completions         messages through the tokenizer's chat template
    POST /admin/adapters              {name, path}: load an adapter from under --adapter-root
    POST /admin/adapters/combine      {name, adapters, weights, how, rank}: a weighted combination
    DELETE /admin/adapters/{name}     unload

Example:
    >>> app = create_app(Engine.from_paths("smollm2-135m", {"outcome": "runs/outcome/adapter"}))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import PeftkitError
from .engine import Engine
from .errors import ApiError, install_error_handlers, parse_body, read_json
from .openapi import openapi_document
from .responses import EventStream, Kind, collect, sse_chunks, whole_response
from .schemas import ChatRequest, CombineRequest, CompletionRequest, LoadAdapterRequest
from .security import confined_adapter_dir, key_matches


def create_app(engine: Engine) -> FastAPI:
    """A FastAPI app serving `engine`; its decode thread runs while the app is up."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="peftkit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.in_flight = 0
    install_error_handlers(app)
    _add_public_routes(app, engine)
    _add_admin_routes(app, engine)
    document = openapi_document(app, engine.settings)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return document

    return app


# -- access ------------------------------------------------------------------------------------------
def require_key(request: Request, engine: Engine) -> None:
    key = engine.settings.api_key
    if key is not None and not key_matches(request.headers.get("authorization"), key):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", code="invalid_api_key")


def require_admin(request: Request, engine: Engine) -> None:
    if engine.settings.api_key is None:
        raise ApiError(403, "admin endpoints are disabled: start the server with --api-key (or PEFTKIT_API_KEY)")
    require_key(request, engine)


# -- generation --------------------------------------------------------------------------------------
def _add_public_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.model_names(), "queued": len(engine.queue), **engine.stats}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        require_key(request, engine)
        return {"object": "list", "data": [_model_card(engine, name) for name in engine.model_names()]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        require_key(request, engine)
        body = parse_body(CompletionRequest, await read_json(request, engine.settings.max_body_bytes))
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) > engine.settings.max_prompts_per_request:
            raise ApiError(400, f"{len(prompts)} prompts in one request; the limit is {engine.settings.max_prompts_per_request}", "prompt")
        adapter = engine.resolve(body.model)
        return await _generate(app, engine, body, "completion", [lambda p=p: engine.encode_completion(adapter, p) for p in prompts])

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        require_key(request, engine)
        body = parse_body(ChatRequest, await read_json(request, engine.settings.max_body_bytes))
        adapter = engine.resolve(body.model)
        messages = [m.as_template_message() for m in body.messages]
        return await _generate(app, engine, body, "chat", [lambda: engine.encode_chat(adapter, messages)])


async def _generate(app: FastAPI, engine: Engine, body: Any, kind: Kind, encoders: list[Callable[[], list[int]]]) -> Any:
    """Tokenize (off the event loop), queue, and answer whole or as a stream; holds concurrency slots."""
    limits = engine.settings
    default = limits.default_max_tokens if kind == "completion" else limits.max_tokens_limit
    params = body.sampling(default, limits.max_tokens_limit)
    if app.state.in_flight + len(encoders) > limits.max_concurrent:
        raise ApiError(429, f"the server is busy ({app.state.in_flight} requests in flight, limit {limits.max_concurrent}); retry later")
    app.state.in_flight += len(encoders)  # reserved before the first await, so concurrent requests see it
    try:
        seqs = [engine.sequence(body.model, await run_in_threadpool(_tokenize, encode), params) for encode in encoders]
    except BaseException:
        app.state.in_flight -= len(encoders)
        raise
    stream = EventStream(seqs)
    for seq in seqs:
        engine.submit(seq)
    if not body.stream:
        try:
            answers = await collect(stream)
        finally:
            stream.cancel()
            app.state.in_flight -= len(seqs)
        return whole_response(kind, body.model, seqs, answers)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[str]:
        try:
            async for chunk in sse_chunks(kind, body.model, stream, include_usage):
                yield chunk
        finally:
            stream.cancel()
            app.state.in_flight -= len(seqs)

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _tokenize(encode: Callable[[], list[int]]) -> list[int]:
    """Run a request's tokenization; text the tokenizer cannot take (e.g. lone surrogates) is the request's fault."""
    try:
        return encode()
    except PeftkitError:
        raise
    except Exception as exc:
        raise ApiError(400, f"the prompt could not be tokenized ({type(exc).__name__}: {str(exc)[:200]})") from None


def _model_card(engine: Engine, name: str) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "peftkit"}
    if name in engine.adapters:
        card.update(parent=None if engine.merged else engine.base_name, root=engine.adapters[name].source)
    return card


# -- admin -------------------------------------------------------------------------------------------
def _add_admin_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/admin/adapters", status_code=201)
    async def load_adapter(request: Request) -> Any:
        require_admin(request, engine)
        body = parse_body(LoadAdapterRequest, await read_json(request, engine.settings.max_body_bytes))
        root = engine.settings.adapter_root
        if root is None:
            raise ApiError(403, "loading adapters at run time is disabled: start the server with --adapter-root DIR")
        folder = confined_adapter_dir(root, body.path)
        await run_in_threadpool(engine.load_adapter, body.name, folder)
        return JSONResponse(_model_card(engine, body.name), status_code=201)

    @app.post("/admin/adapters/combine", status_code=201)
    async def combine(request: Request) -> Any:
        require_admin(request, engine)
        body = parse_body(CombineRequest, await read_json(request, engine.settings.max_body_bytes))
        await run_in_threadpool(engine.combine, body.name, body.adapters, body.weights, body.how, body.rank)
        return JSONResponse(_model_card(engine, body.name), status_code=201)

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
        require_admin(request, engine)
        await run_in_threadpool(engine.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}
