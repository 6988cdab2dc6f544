"""vLLM's OpenAI surface as clients use it: log-probs and echo (checked against the model itself), token-id
prompts, n / best_of, many stops, sampling extras, chat log-probs, tokenizer routes, names, refusals by field."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import build_model
from peftkit import AdaptedModel
from peftkit.serve import Engine, ServeSettings, create_app
from peftkit.serve.engine import served_name
from peftkit.serve.sampling import SamplingParams, banned_ngram_tokens, process_logits
from peftkit.serve.server import base_of
from serving_helpers import PROMPTS, save_all, single_thread  # noqa: F401 (autouse fixture)

KEY = "openai-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT_IDS = [5, 17, 42, 99, 7, 63, 12]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    return save_all(tmp_path_factory.mktemp("openai-adapters"), len(tokenizer))


@pytest.fixture(scope="module")
def client(folders, tokenizer):
    engine = Engine(build_model("llama", len(tokenizer)), tokenizer, "tiny", ServeSettings(api_key=KEY, max_choices=4))
    for name in ("outcome", "challenge"):
        engine.load_adapter(name, folders[name])
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        yield client


def post(client, path, **body):
    return client.post(path, json=body, headers=AUTH)


def direct_logprobs(folders, tokenizer, adapter, ids) -> torch.Tensor:
    """(T - 1, V) log-probs of each next token, from the model with only `adapter` active (fp32, no server)."""
    adapted = AdaptedModel(build_model("llama", len(tokenizer)))
    adapted.load_adapter(folders[adapter], name=adapter)
    adapted.set_adapter(adapter)
    with torch.no_grad():
        logits = adapted(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1]


def test_echo_and_logprobs_equal_the_model_with_the_adapter(client, folders, tokenizer):
    r = post(client, "/v1/completions", model="outcome", prompt=PROMPT_IDS, max_tokens=3, temperature=0, echo=True, logprobs=3)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    ids = list(PROMPT_IDS)
    for _ in range(3):  # the greedy continuation, straight from the model
        ids.append(int(direct_logprobs(folders, tokenizer, "outcome", ids + [0])[-1].argmax()))
    expected = direct_logprobs(folders, tokenizer, "outcome", ids)
    assert lp["tokens"] == [tokenizer.decode([i]) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None, "the first prompt token has no log-prob"
    for position in range(1, len(ids)):
        assert abs(lp["token_logprobs"][position] - float(expected[position - 1, ids[position]])) < 1e-4, position
        best = expected[position - 1].topk(3).values
        top = sorted(lp["top_logprobs"][position].values(), reverse=True)[:3]
        assert max(abs(a - float(b)) for a, b in zip(top, best)) < 1e-4
    assert choice["text"] == tokenizer.decode(PROMPT_IDS) + tokenizer.decode(ids[len(PROMPT_IDS):], skip_special_tokens=True)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_lm_eval_loglikelihood_request_and_max_tokens_zero(client, folders, tokenizer):
    """The request lm-evaluation-harness sends for multiple-choice tasks, batched as lists of token ids."""
    batch = [PROMPT_IDS, PROMPT_IDS[:4]]
    r = post(client, "/v1/completions", model="challenge", prompt=batch, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    expected = direct_logprobs(folders, tokenizer, "challenge", PROMPT_IDS)
    for choice, ids in zip(choices, batch):
        got = choice["logprobs"]["token_logprobs"][1 : len(ids)]
        want = [float(expected[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
        for value, top in zip(got, choice["logprobs"]["top_logprobs"][1 : len(ids)]):
            assert value <= max(top.values()) + 1e-9  # lm-eval's is_greedy check reads this
    r = post(client, "/v1/completions", model="challenge", prompt=PROMPT_IDS, max_tokens=0, echo=True, logprobs=0)
    body = r.json()
    assert r.status_code == 200 and body["usage"]["completion_tokens"] == 0
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == len(PROMPT_IDS)


def test_n_and_best_of(client):
    r = post(client, "/v1/completions", model="outcome", prompt=["We", "It is"], max_tokens=5, temperature=1.0, seed=3, n=3)
    choices = r.json()["choices"]
    assert sorted(c["index"] for c in choices) == list(range(6))
    assert len({c["text"] for c in choices[:3]}) > 1, "seeded choices differ from each other"
    again = post(client, "/v1/completions", model="outcome", prompt=["We", "It is"], max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in choices], "and repeat with the seed"
    r = post(client, "/v1/completions", model="outcome", prompt="We", max_tokens=5, temperature=1.0, seed=3, best_of=4, logprobs=0)
    body = r.json()
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] > 5
    sampled = post(client, "/v1/completions", model="outcome", prompt="We", max_tokens=5, temperature=1.0, seed=3, n=4, logprobs=0)
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in sampled.json()["choices"]]
    assert abs(sum(body["choices"][0]["logprobs"]["token_logprobs"]) - max(totals)) < 1e-5


def test_stops_stop_token_ids_min_tokens_and_logit_bias(client, tokenizer):
    free = post(client, "/v1/completions", model="tiny", prompt=PROMPT_IDS, max_tokens=8, temperature=0, ignore_eos=True).json()
    text = free["choices"][0]["text"]
    stops = [f"never{i}" for i in range(19)] + [text[3:5]]
    r = post(client, "/v1/completions", model="tiny", prompt=PROMPT_IDS, max_tokens=8, temperature=0, ignore_eos=True, stop=stops)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == text[: text.find(text[3:5])]
    forced = {"logit_bias": {"77": 100}, "stop_token_ids": [77]}
    r = post(client, "/v1/completions", model="tiny", prompt=PROMPT_IDS, max_tokens=8, temperature=0, **forced)
    assert r.json()["choices"][0]["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == 0
    r = post(client, "/v1/completions", model="tiny", prompt=PROMPT_IDS, max_tokens=8, temperature=0, min_tokens=3, **forced)
    assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "stop"
    r = post(client, "/v1/completions", model="tiny", prompt=PROMPT_IDS, max_tokens=4, temperature=0, ignore_eos=True,
             logit_bias={"77": 100}, logprobs=0)
    assert r.json()["choices"][0]["logprobs"]["tokens"] == [tokenizer.decode([77])] * 4


def test_penalties_change_the_choice_as_documented():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    out = process_logits(logits, params, prompt=[3], generated=[0, 0, 2], end_ids=set())
    # token 0: 2 / 2 (repetition) - 0.5 - 2 * 0.25; token 2: -1 * 2 - 0.5 - 0.25; token 3 (prompt only): 0.5 / 2
    assert out.tolist() == [0.0, 1.0, -2.75, 0.25]
    assert logits.tolist() == [2.0, 1.0, -1.0, 0.5], "the raw logits (reported log-probs) stay untouched"
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3} and banned_ngram_tokens([1, 2, 3], 3) == set()
    bias = process_logits(logits, SamplingParams(logit_bias={1: -100.0}, min_tokens=2), [], [], end_ids={0})
    assert bias[0] == float("-inf") and bias[1] == -99.0


def test_no_repeat_ngram_size_and_sampling_extras_answer(client):
    engine = client.app.state.engine
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, no_repeat_ngram_size=2, repetition_penalty=1.3)
    seq = engine.sequence("tiny", engine.encode_completion(None, "We"), params)
    engine.run_batch([seq])
    ids = seq.prompt_ids + seq.tokens
    pairs = list(zip(ids, ids[1:]))
    assert len(seq.tokens) == 24 and len(set(pairs)) == len(pairs)
    for extra in ({"top_k": 5, "min_p": 0.05, "temperature": 0.9, "seed": 1}, {"presence_penalty": 1.5, "frequency_penalty": -1},
                  {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}):
        assert post(client, "/v1/completions", model="outcome", prompt="We", max_tokens=4, **extra).status_code == 200


def test_chat_logprobs_and_streamed_logprobs(client):
    messages = [{"role": "user", "content": "What did the paper find?"}]
    r = post(client, "/v1/chat/completions", model="challenge", messages=messages, max_tokens=5, temperature=0, logprobs=True,
             top_logprobs=2)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["logprob"] <= 0 and c["logprob"] >= c["top_logprobs"][1]["logprob"] - 1e-6 for c in content)
    with client.stream("POST", "/v1/completions", headers=AUTH, json={
        "model": "outcome", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True, "logprobs": 1,
        "stream_options": {"include_usage": True}}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [v for c in chunks if c["choices"] and c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    whole = post(client, "/v1/completions", model="outcome", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=1).json()
    assert streamed == whole["choices"][0]["logprobs"]["token_logprobs"]
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, "n"),
    ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(1000)]}, "stop"),
    ("/v1/completions", {"prompt": [5, 100000]}, None),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "n": 3}, "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids"),
])
def test_unsupported_or_out_of_range_fields_are_refused_by_name(client, path, body, param):
    r = post(client, path, model="outcome", **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    if param is not None:
        assert param in error["message"]
        others = {"tools", "logprobs", "suffix", "echo", "best_of"} - {param} - set(body)
        assert not any(f"`{other}`" in error["message"] for other in others), "name only the field that was sent"


def test_tokenizer_routes_as_vllm_shapes_them(client, tokenizer):
    r = post(client, "/tokenize", prompt="It is cold outside.", add_special_tokens=False)
    assert r.json()["tokens"] == tokenizer.encode("It is cold outside.", add_special_tokens=False)
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 512
    chat = post(client, "/tokenize", model="outcome", messages=[{"role": "user", "content": "hi"}]).json()
    assert tokenizer.decode(chat["tokens"]).endswith("<|im_start|>assistant\n")
    assert post(client, "/detokenize", tokens=r.json()["tokens"]).json() == {"prompt": "It is cold outside."}
    info = client.get("/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == tokenizer.eos_token and "chat_template" in info
    assert post(client, "/detokenize", tokens=[-3]).status_code == 400


def test_models_by_id_with_parents(client):
    cards = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert cards["outcome"]["parent"] == "tiny" and cards["tiny"]["parent"] is None
    assert client.get("/v1/models/challenge", headers=AUTH).json()["parent"] == "tiny"
    r = client.get("/v1/models/ghost", headers=AUTH)
    assert r.status_code == 404 and "not served" in r.json()["error"]["message"]


def test_served_names(tmp_path, folders):
    assert served_name("smollm2-135m") == "smollm2-135m"
    (tmp_path / "my-base").mkdir()
    assert served_name(str(tmp_path / "my-base")) == "my-base" and served_name("org/model") == "org/model"
    sidecar = folders["outcome"] / "peftkit.json"
    meta = json.loads(sidecar.read_text())
    copy = tmp_path / "adapter"
    copy.mkdir()
    for file in folders["outcome"].iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "peftkit.json").write_text(json.dumps({**meta, "base_model": {"builtin": "smollm2-135m"}}))
    assert base_of({"a": copy}) == "smollm2-135m", "a built-in base is served by its name, not its cache path"
