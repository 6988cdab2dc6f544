"""The HTTP app in-process: OpenAI shapes, model selection, streaming, admin, keys, paths, and 4xx for bad input."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from conftest import build_model
from peftkit.serve import Engine, ServeSettings, create_app
from peftkit.serve.security import check_adapter_files, confined_adapter_dir
from serving_helpers import PROMPTS, save_adapter, save_all, single_thread  # noqa: F401 (autouse fixture)

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("adapter-root")
    save_all(root, len(tokenizer))
    return root


def make_client(root, tokenizer, **limits) -> TestClient:
    settings = ServeSettings(api_key=KEY, adapter_root=root, max_wait_ms=1, **limits)
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "tiny-base", settings)
    engine.load_adapter("outcome", root / "outcome")
    engine.load_adapter("challenge", root / "challenge")
    return TestClient(create_app(engine), raise_server_exceptions=False)


@pytest.fixture()
def client(root, tokenizer):
    with make_client(root, tokenizer) as client:
        yield client


def complete(client, model="outcome", **extra):
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body, headers=AUTH)


def test_models_health_and_completions(client):
    assert client.get("/health").json()["status"] == "ok"
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids == ["tiny-base", "outcome", "challenge"]
    answers = {}
    for model in ids:
        r = complete(client, model)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        answers[model] = body["choices"][0]["text"]
    assert len(set(answers.values())) == 3, "each model name must select a different model"
    assert complete(client, "outcome").json()["choices"][0]["text"] == answers["outcome"]


def test_prompt_lists_and_chat(client):
    r = client.post("/v1/completions", json={"model": "tiny-base", "prompt": PROMPTS[:3], "max_tokens": 4, "temperature": 0}, headers=AUTH)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    chat = {"model": "challenge", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_tokens": 5, "temperature": 0}
    r = client.post("/v1/chat/completions", json=chat, headers=AUTH)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    parts = {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert client.post("/v1/chat/completions", json=parts, headers=AUTH).status_code == 200


def test_streaming_matches_the_whole_answer(client):
    whole = complete(client, "outcome").json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", headers=AUTH, json={
        "model": "outcome", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_api_key_is_required_when_configured(client):
    assert client.get("/v1/models").status_code == 401
    r = client.post("/v1/completions", json={"model": "outcome", "prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/health").status_code == 200


def test_admin_needs_a_key_even_when_v1_is_open(root, tokenizer):
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "base", ServeSettings(adapter_root=root))
    with TestClient(create_app(engine)) as open_client:
        assert open_client.get("/v1/models").status_code == 200
        r = open_client.post("/admin/adapters", json={"name": "outcome", "path": "outcome"})
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]


def test_admin_load_combine_unload(client):
    r = client.post("/admin/adapters", json={"name": "approach", "path": "approach"}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert complete(client, "approach").status_code == 200
    assert client.post("/admin/adapters", json={"name": "approach", "path": "approach"}, headers=AUTH).status_code == 409
    r = client.post("/admin/adapters/combine", headers=AUTH,
                    json={"name": "mix", "adapters": ["outcome", "approach"], "weights": [0.7, 0.3], "how": "svd", "rank": 3})
    assert r.status_code == 201, r.text
    assert complete(client, "mix").status_code == 200
    r = client.post("/admin/adapters/combine", headers=AUTH, json={"name": "bad", "adapters": ["outcome", "approach"], "weights": [1, 1], "how": "linear"})
    assert r.status_code == 400 and "rank" in r.json()["error"]["message"]
    assert client.delete("/admin/adapters/approach", headers=AUTH).status_code == 200
    assert complete(client, "approach").status_code == 404
    assert client.delete("/admin/adapters/approach", headers=AUTH).status_code == 404
    assert client.delete("/admin/adapters/outcome").status_code == 401


def test_adapter_paths_stay_under_the_root(client, root, tmp_path, tokenizer):
    outside = save_adapter(tmp_path / "outside", len(tokenizer), 2, ["q_proj"], seed=5)
    (root / "link").symlink_to(outside, target_is_directory=True)
    linked_file = root / "filelink"
    linked_file.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (linked_file / name).unlink(missing_ok=True)
        (linked_file / name).symlink_to(outside / name)
    for path in ("../outside", str(outside), "link", "filelink", "outcome/../../outside"):
        r = client.post("/admin/adapters", json={"name": "evil", "path": path}, headers=AUTH)
        assert r.status_code == 403, (path, r.text)
    r = client.post("/admin/adapters", json={"name": "evil", "path": "missing"}, headers=AUTH)
    assert r.status_code == 400 and "no such folder" in r.json()["error"]["message"]
    assert confined_adapter_dir(root, str(root / "outcome")) == (root / "outcome").resolve()


def test_pickles_and_integer_tensors_are_refused(root, tmp_path):
    import torch
    from safetensors.torch import save_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((root / "outcome" / "adapter_config.json").read_text())
    torch.save({"x": torch.zeros(2)}, pickled / "adapter_model.bin")
    with pytest.raises(Exception, match="safetensors only"):
        check_adapter_files(pickled)
    ints = tmp_path / "ints"
    ints.mkdir()
    (ints / "adapter_config.json").write_text((root / "outcome" / "adapter_config.json").read_text())
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2, dtype=torch.int64)}, str(ints / "adapter_model.safetensors"))
    with pytest.raises(Exception, match="dtype I64"):
        check_adapter_files(ints)


def test_limits(root, tokenizer):
    with make_client(root, tokenizer, max_body_bytes=2000, max_prompt_tokens=40, max_tokens_limit=8, max_concurrent=2) as client:
        r = client.post("/v1/completions", content=b'{"model": "outcome", "prompt": "' + b"a" * 3000 + b'"}', headers=AUTH)
        assert r.status_code == 413
        r = complete(client, "tiny-base", prompt="word " * 100)
        assert r.status_code == 400 and "limit is 40" in r.json()["error"]["message"]
        assert complete(client, max_tokens=9).status_code == 400
        r = complete(client, prompt=["a", "b", "c"])
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


MALFORMED = [
    b"", b"{", b"null", b"[]", b"42", b'"text"', b"{}", b'{"model": 1}', b'{"model": "outcome"}',
    b'{"model": "outcome", "prompt": 5}', b'{"model": "outcome", "prompt": []}', b'{"model": "outcome", "prompt": [1, "a"]}', b'{"model": "outcome", "prompt": [[1], []]}', b'{"model": "outcome", "prompt": [-1]}',
    b'{"model": "outcome", "prompt": "x", "max_tokens": -1}', b'{"model": "outcome", "prompt": "x", "max_tokens": "many"}',
    b'{"model": "outcome", "prompt": "x", "max_tokens": 1e400}', b'{"model": "outcome", "prompt": "x", "temperature": -1}',
    b'{"model": "outcome", "prompt": "x", "temperature": NaN}', b'{"model": "outcome", "prompt": "x", "top_p": 0}',
    b'{"model": "outcome", "prompt": "x", "n": 0}', b'{"model": "outcome", "prompt": "x", "n": 1000}', b'{"model": "outcome", "prompt": "x", "stop": ["", "a"]}',
    b'{"model": "outcome", "prompt": "x", "stop": [' + b','.join(b'"s%d"' % i for i in range(100)) + b']}', b'{"model": "outcome", "prompt": "x", "stop": 7}',
    b'{"model": "outcome", "prompt": "x", "logprobs": 50}', b'{"model": "outcome", "prompt": "x", "echo": true, "stream": true}',
    b'{"model": "outcome", "prompt": "x", "presence_penalty": 5}', b'{"model": "outcome", "prompt": "x", "logit_bias": {"x": 1}}', b'{"model": "outcome", "prompt": "x", "logit_bias": {"99999": 1}}',
    b'{"model": "outcome", "prompt": "x", "stream": "yes please"}', b'{"model": "outcome", "prompt": "x", "seed": "s"}',
    b'{"model": "nope", "prompt": "x"}', b'{"model": "", "prompt": "x"}', b'\xff\xfe{"model"', b'{"model": "outcome", "prompt": "\\ud800"}',
    b"[" * 100000 + b"]" * 100000, b'{"model": "outcome", "prompt": {"a": 1}}', b'{"model": ["outcome"], "prompt": "x"}',
    b'{"model": "outcome", "prompt": "x", "stream_options": 3}', b'{"model": "outcome", "prompt": "x", "max_tokens": 0}',
    b'{"model": "outcome", "prompt": "x", "seed": 123456789012345678901234567890}', b'{"model": "outcome", "prompt": "x", "seed": -1}',
]
MALFORMED_CHAT = [
    b'{"model": "outcome"}', b'{"model": "outcome", "messages": []}', b'{"model": "outcome", "messages": "hi"}',
    b'{"model": "outcome", "messages": [{"role": "wizard", "content": "x"}]}', b'{"model": "outcome", "messages": [{"content": "x"}]}',
    b'{"model": "outcome", "messages": [{"role": "user"}]}',
    b'{"model": "outcome", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}',
    b'{"model": "outcome", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
    b'{"model": "outcome", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}',
]
MALFORMED_ADMIN = [b"{}", b'{"name": "a b", "path": "outcome"}', b'{"name": "x", "path": "outcome", "extra": 1}', b'{"name": "x"}',
                   b'{"name": "x", "path": ""}', b'{"name": "x", "path": "out\\u0000come"}', b'{"name": "tiny-base", "path": "outcome"}']


@pytest.mark.parametrize("url, bodies", [
    ("/v1/completions", MALFORMED), ("/v1/chat/completions", MALFORMED_CHAT), ("/admin/adapters", MALFORMED_ADMIN),
    ("/admin/adapters/combine", [b'{"name": "c", "adapters": ["outcome"], "weights": []}', b'{"name": "c", "adapters": ["outcome"], "weights": [1], "how": "ties"}',
                                 b'{"name": "c", "adapters": ["ghost"], "weights": [1]}', b'{"name": "c", "adapters": ["outcome", "challenge"], "weights": [1]}']),
])
def test_malformed_bodies_get_a_json_4xx_naming_the_problem(client, url, bodies):
    for body in bodies:
        r = client.post(url, content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"], body[:80]


def test_extreme_but_valid_sampling_values_answer(client):
    for extra in ({"temperature": 1e-300}, {"temperature": 2, "top_p": 1e-300, "seed": 2**63 - 1}, {"stop": ["\n", "x" * 256]}):
        assert complete(client, **extra).status_code == 200, extra


def test_unknown_routes_and_methods_are_json_errors(client):
    assert client.get("/v1/nothing", headers=AUTH).json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_unreadable_adapter_is_a_4xx(client, root, tokenizer):
    folder = save_adapter(root / "locked", len(tokenizer), 2, ["q_proj"], seed=6)
    weights = folder / "adapter_model.safetensors"
    weights.unlink()
    weights.mkdir()  # unreadable as a file, even for root (CI runs as root, so chmod 0 proves nothing)
    r = client.post("/admin/adapters", json={"name": "locked", "path": "locked"}, headers=AUTH)
    assert r.status_code == 400 and "adapter_model" in r.json()["error"]["message"]
