"""The HTTP server: OpenAI-compatible endpoints over one base and many adapters, plus admin endpoints.

    GET  /health                      liveness (no key needed)
    GET  /openapi.json                the API's OpenAPI document (no key needed)
    GET  /v1/models                   the base and every adapter (parent = the base), by the name requests use
    GET  /v1/models/{id}              one of them
    POST /v1/completions              `model` picks the base or an adapter; text or token ids; logprobs, echo, n
    POST /v1/chat/completions         messages through the tokenizer's chat template; logprobs
    POST /tokenize, /detokenize       vLLM's tokenizer routes (lm-evaluation-harness finds the tokenizer here)
    GET  /tokenizer_info              eos / bos / pad tokens and the chat template
    GET  /metrics                     Prometheus text: requests, tokens, queue, TTFT and latency histograms
    POST /v1/load_lora_adapter        vLLM's {lora_name, lora_path} (admin key; under --adapter-root)
    POST /v1/unload_lora_adapter      vLLM's {lora_name} (admin key)
    POST /admin/adapters              {name, path}: load an adapter from under --adapter-root
    POST /admin/adapters/combine      {name, adapters, weights, how, rank}: a weighted combination
    DELETE /admin/adapters/{name}     unload

Example:
    >>> app = create_app(Engine.from_paths("smollm2-135m", {"outcome": "runs/outcome/adapter"}))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from ..errors import PeftkitError
from .engine import Engine
from .errors import ApiError, install_error_handlers, parse_body, read_json
from .metrics import ServerMetrics
from .openapi import openapi_document
from .responses import EventStream, Kind, PromptChoices, collect, sse_chunks, whole_response
from .sampling import SamplingParams
from .schemas import (
    ChatRequest, CombineRequest, CompletionRequest, DetokenizeRequest, LoadAdapterRequest, TokenizeRequest, VllmLoadRequest,
    VllmUnloadRequest,
)
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
    app.state.metrics = metrics = ServerMetrics(engine)
    install_error_handlers(app)

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.http.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _add_public_routes(app, engine)
    _add_tokenizer_routes(app, engine)
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
        return {"status": "ok", "models": engine.model_names(), "queued": len(engine.queue), "running": len(engine.batch),
                **engine.stats}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        require_key(request, engine)
        names = engine.model_names()
        names += [n for n in engine.available_adapters() if n not in names]  # served on first request
        return {"object": "list", "data": [_model_card(engine, name) for name in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        require_key(request, engine)
        if model_id not in engine.available_adapters():
            engine.resolve(model_id)
        return _model_card(engine, model_id)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        require_key(request, engine)
        body = parse_body(CompletionRequest, await read_json(request, engine.settings.max_body_bytes))
        prompts = body.prompts()
        if len(prompts) > engine.settings.max_prompts_per_request:
            raise ApiError(400, f"{len(prompts)} prompts in one request; the limit is {engine.settings.max_prompts_per_request}", "prompt")
        adapter = await _resolve(engine, body.model)
        for prompt in prompts:
            if isinstance(prompt, list):
                engine.check_prompt_ids(prompt)
        encoders = [_completion_encoder(engine, adapter, p) for p in prompts]
        return await _generate(app, engine, request, body, "completion", encoders, echo=body.echo)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        require_key(request, engine)
        raise ApiError(400, "this server generates text; embeddings come from a server started with an embedding adapter "
                            "(peftkit serve --adapter NAME=runs/<embedding run>/adapter)", "model")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        require_key(request, engine)
        body = parse_body(ChatRequest, await read_json(request, engine.settings.max_body_bytes))
        adapter = await _resolve(engine, body.model)
        messages = [m.as_template_message() for m in body.messages]
        return await _generate(app, engine, request, body, "chat", [lambda: engine.encode_chat(adapter, messages)])


async def _resolve(engine: Engine, model: str) -> str | None:
    """The adapter `model` names, loaded first from --adapter-dir when it is not resident (off the event loop)."""
    await run_in_threadpool(engine.ensure_adapter, model)
    return engine.resolve(model)


def _completion_encoder(engine: Engine, adapter: str | None, prompt: str | list[int]) -> Callable[[], list[int]]:
    """Text fills the served model's template; token ids are used as they are (as vLLM does)."""
    if isinstance(prompt, list):
        return lambda: list(prompt)
    return lambda: engine.encode_completion(adapter, prompt)


async def _generate(
    app: FastAPI, engine: Engine, request: Request, body: Any, kind: Kind,
    encoders: list[Callable[[], list[int]]], echo: bool = False,
) -> Any:
    """Tokenize (off the event loop), queue every choice, answer whole or as a stream; holds concurrency slots.

    A client that disconnects cancels its sequences: they leave the running batch at the next step.
    """
    limits = engine.settings
    default = limits.default_max_tokens if kind == "completion" else limits.max_tokens_limit
    params = body.sampling(default, limits.max_tokens_limit, engine.vocab_size)
    if echo and params.logprobs is not None:
        params.prompt_logprobs = params.logprobs
    per_prompt = body.choices(limits.max_choices)
    count = per_prompt * len(encoders)
    if app.state.in_flight + count > limits.max_concurrent:
        raise ApiError(429, f"the server is busy ({app.state.in_flight} sequences in flight, limit {limits.max_concurrent}); retry later")
    app.state.in_flight += count  # reserved before the first await, so concurrent requests see it
    try:
        prompts = []
        for encode in encoders:
            ids = await run_in_threadpool(_tokenize, encode)
            text = engine.token_text(ids) if echo else ""  # echo: the prompt as the model saw it (template included)
            prompts.append(PromptChoices(text, [engine.sequence(body.model, ids, _nth(params, j)) for j in range(per_prompt)]))
    except BaseException:
        app.state.in_flight -= count
        raise
    seqs = [s for p in prompts for s in p.seqs]
    stream = EventStream(seqs)
    for seq in seqs:
        engine.submit(seq)
    if not body.stream:
        try:
            await _unless_disconnected(request, collect(stream))
        finally:
            stream.cancel()
            app.state.in_flight -= count
            app.state.metrics.finished(body.model, seqs)
        return whole_response(kind, body.model, prompts, body.n, echo, engine.token_text)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[str]:
        try:
            async for chunk in sse_chunks(kind, body.model, stream, prompts, include_usage, engine.token_text):
                yield chunk
        finally:
            stream.cancel()
            app.state.in_flight -= count
            app.state.metrics.finished(body.model, seqs)

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _nth(params: SamplingParams, j: int) -> SamplingParams:
    """The settings of a request's j-th choice: its own seed (seed + j), so seeded choices differ and repeat."""
    return params if j == 0 or params.seed is None else replace(params, seed=(params.seed + j) % 2**63)


async def _unless_disconnected(request: Request, work: Awaitable[None]) -> None:
    """Await `work`, unless the client hangs up first (then the request is abandoned: 499, nobody reads it)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task not in done:
        task.cancel()
        raise ApiError(499, "the client closed the connection before the answer was ready")
    task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _tokenize(encode: Callable[[], list[int]]) -> list[int]:
    """Run a request's tokenization; text the tokenizer cannot take (e.g. lone surrogates) is the request's fault."""
    try:
        return encode()
    except PeftkitError:
        raise
    except Exception as exc:
        raise ApiError(400, f"the prompt could not be tokenized ({type(exc).__name__}: {str(exc)[:200]})", "prompt") from None


def _model_card(engine: Engine, name: str) -> dict[str, Any]:
    """vLLM's model card: adapters name the base as `parent`; `root` is where the weights came from."""
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "peftkit",
            "max_model_len": engine.context_length}
    if name in engine.adapters:
        card.update(parent=None if engine.merged else engine.base_name, root=engine.adapters[name].source)
    elif name != engine.base_name and engine.settings.adapter_dir is not None:  # on disk, loaded on first request
        card.update(parent=engine.base_name, root=str(engine.settings.adapter_dir / name))
    else:
        card.update(parent=None, root=engine.base_source)
    return card


# -- tokenizer (vLLM's routes, which lm-evaluation-harness looks for) ---------------------------------
def _add_tokenizer_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        require_key(request, engine)
        body = parse_body(TokenizeRequest, await read_json(request, engine.settings.max_body_bytes))
        adapter = await _resolve(engine, body.model) if body.model else None
        if body.messages is not None:
            messages = [m.as_template_message() for m in body.messages]
            ids = await run_in_threadpool(_tokenize, lambda: engine.encode_chat(adapter, messages))
        else:
            text = body.prompt or ""
            ids = await run_in_threadpool(_tokenize, lambda: engine.tokenize(text, body.add_special_tokens))
        strs = [engine.token_text(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.context_length, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        require_key(request, engine)
        body = parse_body(DetokenizeRequest, await read_json(request, engine.settings.max_body_bytes))
        if body.model:
            engine.resolve(body.model)
        outside = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
        if outside is not None:
            raise ApiError(400, f"token id {outside} is outside the vocabulary (0 to {engine.vocab_size - 1})", "tokens")
        return {"prompt": engine.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        require_key(request, engine)
        tok = engine.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": engine.context_length}


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

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(request: Request) -> PlainTextResponse:
        require_admin(request, engine)
        body = parse_body(VllmLoadRequest, await read_json(request, engine.settings.max_body_bytes))
        root = engine.settings.adapter_root or engine.settings.adapter_dir
        if root is None:
            raise ApiError(403, "loading adapters at run time is disabled: start the server with --adapter-root DIR")
        folder = confined_adapter_dir(root, body.lora_path)
        await run_in_threadpool(engine.load_adapter, body.lora_name, folder)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(request: Request) -> PlainTextResponse:
        require_admin(request, engine)
        body = parse_body(VllmUnloadRequest, await read_json(request, engine.settings.max_body_bytes))
        await run_in_threadpool(engine.unload_adapter, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
        require_admin(request, engine)
        await run_in_threadpool(engine.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}
