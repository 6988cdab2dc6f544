"""Adapters on demand (--adapter-dir, LRU under --max-adapters, waiting for a load, bad folders as 4xx, folder
safety), vLLM's load / unload endpoints, and /metrics scraped in Prometheus' text format."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import build_model
from peftkit.serve import Engine, ServeSettings, create_app
from serving_helpers import PROMPTS, save_all, single_thread  # noqa: F401 (autouse fixture)

KEY = "adapters-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tokenizer, model_dirs):
    root = tmp_path_factory.mktemp("adapter-dir")
    save_all(root, len(tokenizer))
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text((root / "outcome" / "adapter_config.json").read_text())
    outside = tmp_path_factory.mktemp("outside")
    save_all(outside, len(tokenizer))
    (root / "escape").symlink_to(outside / "outcome", target_is_directory=True)
    return root


def make_client(adapter_dir, tokenizer, max_adapters=2) -> TestClient:
    settings = ServeSettings(api_key=KEY, adapter_dir=adapter_dir, max_adapters=max_adapters, max_wait_ms=1)
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "tiny", settings)
    return TestClient(create_app(engine), raise_server_exceptions=False)


def complete(client, model, **extra):
    return client.post("/v1/completions", headers=AUTH,
                       json={"model": model, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, **extra})


def test_adapters_load_on_first_request_and_the_least_recently_used_is_evicted(adapter_dir, tokenizer):
    with make_client(adapter_dir, tokenizer) as client:
        engine = client.app.state.engine
        listed = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
        assert listed[0] == "tiny" and {"outcome", "challenge", "approach"} <= set(listed) and not engine.adapters
        first = complete(client, "outcome").json()["choices"][0]["text"]
        assert complete(client, "challenge").status_code == 200 and set(engine.adapters) == {"outcome", "challenge"}
        assert complete(client, "outcome").json()["choices"][0]["text"] == first  # outcome is now the most recent
        assert complete(client, "approach").status_code == 200
        assert set(engine.adapters) == {"outcome", "approach"}, "challenge was used longest ago"
        assert complete(client, "challenge").status_code == 200 and "outcome" not in engine.adapters
        assert complete(client, "outcome").json()["choices"][0]["text"] == first, "reloaded, the same answers"
        card = client.get("/v1/models/approach", headers=AUTH).json()
        assert card["parent"] == "tiny"


@pytest.mark.parametrize("model, status, words", [
    ("broken", 400, "no adapter_model.safetensors"),
    ("missing", 404, "no folder 'missing' under --adapter-dir"),
    ("escape", 403, "leads outside the adapter root"),
    ("..", 404, "adapter names are identifiers"),
])
def test_bad_folders_get_a_4xx_naming_the_problem(adapter_dir, tokenizer, model, status, words):
    with make_client(adapter_dir, tokenizer) as client:
        r = complete(client, model)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
        assert not client.app.state.engine.adapters


def test_requests_for_a_loading_adapter_wait_for_the_one_load(adapter_dir, tokenizer):
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "tiny", ServeSettings(adapter_dir=adapter_dir))
    loads = []
    real = engine.load_adapter
    engine.load_adapter = lambda name, folder: (loads.append(name), real(name, folder))[1]
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            engine.ensure_adapter("challenge")
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and loads == ["challenge"] and "challenge" in engine.adapters


def test_vllm_load_and_unload_endpoints(adapter_dir, tokenizer):
    with make_client(adapter_dir, tokenizer, max_adapters=4) as client:
        body = {"lora_name": "mine", "lora_path": "approach"}
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 401
        r = client.post("/v1/load_lora_adapter", json=body, headers=AUTH)
        assert r.status_code == 200 and "added successfully" in r.text
        assert complete(client, "mine").status_code == 200
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": "../x"}, headers=AUTH)
        assert r.status_code == 403
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}, headers=AUTH)
        assert r.status_code == 200 and "removed" in r.text
        assert complete(client, "mine").status_code == 404


def test_metrics_are_scraped_in_prometheus_text(adapter_dir, tokenizer):
    with make_client(adapter_dir, tokenizer) as client:
        for model in ("tiny", "outcome", "outcome"):
            assert complete(client, model, ignore_eos=True).status_code == 200
        with client.stream("POST", "/v1/completions", headers=AUTH, json={
                "model": "challenge", "prompt": "We", "max_tokens": 3, "temperature": 0, "stream": True}) as r:
            assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
        assert complete(client, "ghost").status_code == 404
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert samples[("peftkit_sequences_total", (("model", "outcome"),))] == 2
    assert samples[("peftkit_generation_tokens_total", (("model", "outcome"),))] == 8
    assert samples[("peftkit_sequences_total", (("model", "challenge"),))] == 1
    assert samples[("peftkit_time_to_first_token_seconds_count", (("model", "tiny"),))] == 1
    assert samples[("peftkit_request_latency_seconds_count", (("model", "outcome"),))] == 2
    assert samples[("peftkit_http_requests_total", (("path", "/v1/completions"), ("status", "404")))] == 1
    assert samples[("peftkit_running_sequences", ())] == 0 and samples[("peftkit_waiting_sequences", ())] == 0
    assert samples[("peftkit_resident_adapters", ())] == 2
