"""The server's OpenAPI document (GET /openapi.json): request bodies from the pydantic schemas,
responses and every error status the endpoints answer with, and the server's own limits.

The routes read their bodies themselves (size limit first, then JSON, then the schema), so FastAPI
cannot see the bodies; this module adds them. Tools (schemathesis, client generators) read it.

Example:
    >>> doc = openapi_document(app, engine.settings)
    >>> sorted(doc["paths"])
    ['/admin/adapters', '/admin/adapters/combine', '/admin/adapters/{name}', '/health', '/v1/chat/completions', ...]
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .. import __version__
from .schemas import (
    ChatRequest, CombineRequest, CompletionRequest, DetokenizeRequest, LoadAdapterRequest, TokenizeRequest, VllmLoadRequest,
    VllmUnloadRequest,
)
from .settings import ServeSettings

REF = "#/components/schemas/{model}"
ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
CHOICE_COMMON = {"index": {"type": "integer", "minimum": 0}, "finish_reason": {"type": ["string", "null"]}}


def _generation_response(obj: str, choice_key: str, choice_schema: dict[str, Any]) -> dict[str, Any]:
    """A whole completion / chat completion: header fields, choices (each with `choice_key`), usage."""
    choice = {"type": "object", "required": ["index", choice_key, "finish_reason"],
              "properties": {**CHOICE_COMMON, choice_key: choice_schema}}
    return {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {"id": {"type": "string"}, "object": {"const": obj}, "created": {"type": "integer"},
                       "model": {"type": "string"}, "usage": USAGE, "choices": {"type": "array", "minItems": 1, "items": choice}},
    }


TOKENIZED = {"type": "object", "required": ["count", "max_model_len", "tokens"],
             "properties": {"count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                            "tokens": {"type": "array", "items": {"type": "integer"}}}}
EMBEDDINGS = {"type": "object", "required": ["object", "data"], "description": "from a server of embedding adapters only"}
DETOKENIZED = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}
TOKENIZER_INFO = {"type": "object", "required": ["eos_token"], "properties": {"eos_token": {"type": ["string", "null"]}}}
COMPLETION = _generation_response("text_completion", "text", {"type": "string"})
CHAT = _generation_response("chat.completion", "message", {
    "type": "object", "required": ["role", "content"], "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}})
MODEL_CARD = {"type": "object", "required": ["id", "object", "owned_by"],
              "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "owned_by": {"type": "string"}}}
MODEL_LIST = {"type": "object", "required": ["object", "data"],
              "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL_CARD}}}
DELETED = {"type": "object", "required": ["id", "deleted"], "properties": {"id": {"type": "string"}, "deleted": {"const": True}}}
HEALTH = {"type": "object", "required": ["status", "models"],
          "properties": {"status": {"const": "ok"}, "models": {"type": "array", "items": {"type": "string"}}}}
TEXT = {"type": "string", "description": "plain text (vLLM's answer to adapter loads and unloads)"}
STREAM = {"type": "string", "description": "server-sent events: `data: {chunk}` lines, then `data: [DONE]`"}

# path -> method -> (request body model or None, success status, success schema, streams?, error statuses)
GENERATION_ERRORS = (400, 401, 404, 413, 415, 429, 500, 503)
ADMIN_ERRORS = (400, 401, 403, 404, 409, 413, 415)
ENDPOINTS: dict[str, dict[str, tuple[type[BaseModel] | None, int, dict[str, Any], bool, tuple[int, ...]]]] = {
    "/health": {"get": (None, 200, HEALTH, False, ())},
    "/v1/models": {"get": (None, 200, MODEL_LIST, False, (401,))},
    "/v1/models/{model_id}": {"get": (None, 200, MODEL_CARD, False, (401, 404))},
    "/v1/completions": {"post": (CompletionRequest, 200, COMPLETION, True, GENERATION_ERRORS)},
    "/v1/chat/completions": {"post": (ChatRequest, 200, CHAT, True, GENERATION_ERRORS)},
    "/v1/embeddings": {"post": (None, 200, EMBEDDINGS, False, (400, 401))},
    "/tokenize": {"post": (TokenizeRequest, 200, TOKENIZED, False, (400, 401, 404, 413, 415))},
    "/detokenize": {"post": (DetokenizeRequest, 200, DETOKENIZED, False, (400, 401, 404, 413, 415))},
    "/tokenizer_info": {"get": (None, 200, TOKENIZER_INFO, False, (401,))},
    "/v1/load_lora_adapter": {"post": (VllmLoadRequest, 200, TEXT, False, ADMIN_ERRORS)},
    "/v1/unload_lora_adapter": {"post": (VllmUnloadRequest, 200, TEXT, False, ADMIN_ERRORS)},
    "/admin/adapters": {"post": (LoadAdapterRequest, 201, MODEL_CARD, False, ADMIN_ERRORS)},
    "/admin/adapters/combine": {"post": (CombineRequest, 201, MODEL_CARD, False, ADMIN_ERRORS)},
    "/admin/adapters/{name}": {"delete": (None, 200, DELETED, False, (401, 403, 404, 409))},
}


def _request_schema(model: type[BaseModel], schemas: dict[str, Any], settings: ServeSettings) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    schemas.update(schema.pop("$defs", {}))
    for key in ("max_tokens", "max_completion_tokens"):
        if key in schema.get("properties", {}):  # the server's own limit, so clients and fuzzers know it
            schema["properties"][key] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": settings.max_tokens_limit},
                                                   {"type": "null"}]}
    schemas[model.__name__] = schema
    return {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}


def openapi_document(app: FastAPI, settings: ServeSettings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `create_app`'s routes, with bodies, responses and limits filled in."""
    doc = get_openapi(title="peftkit serve", version=__version__, routes=app.routes,
                      description="OpenAI-compatible completions over one base model and its adapters.")
    schemas: dict[str, Any] = {"Error": ERROR}
    doc["components"] = {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    error = {"description": "an OpenAI-style error object",
             "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    for path, methods in ENDPOINTS.items():
        for method, (body, status, success, streams, errors) in methods.items():
            operation = doc["paths"][path][method]
            content = {"text/plain" if success is TEXT else "application/json": {"schema": success}}
            if streams:
                content["text/event-stream"] = {"schema": STREAM}
            operation["responses"] = {str(status): {"description": "success", "content": content},
                                      **{str(code): error for code in errors}}
            if body is not None:
                operation["requestBody"] = _request_schema(body, schemas, settings)
            if errors:
                operation["security"] = [{"bearer": []}]
    return doc
