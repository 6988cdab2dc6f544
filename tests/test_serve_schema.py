"""schemathesis against the server's own OpenAPI document, in-process (ASGI, tiny model, no network):
generated requests, valid and not, never get a 500, and every response conforms to the document."""

from __future__ import annotations

import pytest
import schemathesis
from conftest import build_model
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serving_helpers import save_all, single_thread  # noqa: F401 (autouse fixture)

from peftkit.serve import Engine, ServeSettings, create_app

KEY = "schema-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 15


@pytest.fixture(scope="module")
def app_schema(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("schema-root")
    folders = save_all(root, len(tokenizer))
    limits = ServeSettings(api_key=KEY, adapter_root=root, max_wait_ms=1, max_tokens_limit=4, max_prompt_tokens=64)
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "tiny", limits)
    for name in ("outcome", "challenge"):
        engine.load_adapter(name, folders[name])
    engine.start()  # the ASGI transport does not run the app's lifespan
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(engine))
    engine.stop()


def fuzz_operation(operation, mode: GenerationMode, calls: dict[str, int], statuses: dict[int, int]) -> None:
    """EXAMPLES generated requests for one operation (schemathesis' strategy, driven by hypothesis)."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    def call(case):
        response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)
        calls[operation.label] = calls.get(operation.label, 0) + 1
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    call()


def test_generated_requests_get_no_500_and_conform(app_schema):
    """Every operation, with schema-valid data and (where it takes input) invalid data."""
    calls: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for result in app_schema.get_all_operations():
        operation = result.ok()
        fuzz_operation(operation, GenerationMode.POSITIVE, calls, statuses)
        if operation.method.upper() != "GET":  # GETs take no input: nothing to make invalid
            fuzz_operation(operation, GenerationMode.NEGATIVE, calls, statuses)
    print(f"schemathesis: {len(calls)} operations, {sum(calls.values())} cases, statuses {statuses}: {calls}")
    assert len(calls) == 14 and sum(calls.values()) >= 250, calls
    assert statuses.get(200, 0) > 0 and any(400 <= s < 500 for s in statuses), statuses


def test_the_document_covers_every_endpoint(app_schema):
    paths = app_schema.raw_schema["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/adapters", "/admin/adapters/{name}"} <= set(paths)
    body = paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
