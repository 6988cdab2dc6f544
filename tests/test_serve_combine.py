"""Weighted adapter combinations against HF PEFT's add_weighted_adapter; the `combine` and `serve` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_model
from peftkit import AdaptedModel
from peftkit.cli import app
from peftkit.combine import combine_adapters, split_weights
from peftkit.errors import AdapterError
from peftkit.methods.lora import LoraLinear
from peftkit.serve.server import parse_adapter_specs
from serving_helpers import save_adapter, single_thread  # noqa: F401 (autouse fixture)

WEIGHTS = [0.6, -0.4]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("combine")
    vocab = len(tokenizer)
    return {
        "a": save_adapter(root / "a", vocab, 4, ["q_proj", "v_proj"], seed=1),
        "b": save_adapter(root / "b", vocab, 4, ["q_proj", "v_proj"], seed=2),
        "c": save_adapter(root / "c", vocab, 8, ["q_proj", "v_proj"], seed=3),
    }


def peft_combination(folders, tokenizer, names, how, rank=None):
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_model("llama", len(tokenizer)), str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.add_weighted_adapter(names, WEIGHTS, "mix", combination_type=how, svd_rank=rank)
    return {path: m for path, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "mix" in m.lora_A}


def ours(folders, tokenizer, names, how, rank=None):
    adapted = AdaptedModel(build_model("llama", len(tokenizer)))
    for name in names:
        adapted.load_adapter(folders[name], name=name)
    config = combine_adapters(adapted, names, WEIGHTS, "mix", how=how, rank=rank)
    return config, {path: m for path, m in adapted.model.named_modules() if isinstance(m, LoraLinear) and "mix" in m.lora_A}


@pytest.mark.parametrize("names, how, rank", [(["a", "b"], "linear", None), (["a", "c"], "cat", None), (["a", "c"], "svd", None), (["a", "c"], "svd", 3)])
def test_combination_matches_peft(folders, tokenizer, names, how, rank):
    reference = peft_combination(folders, tokenizer, names, how, rank)
    config, layers = ours(folders, tokenizer, names, how, rank)
    assert set(layers) == set(reference) and len(layers) == 4
    assert config.r == {"linear": 4, "cat": 12, "svd": rank or 8}[how] and config.alpha == config.r
    for path, layer in layers.items():
        theirs = reference[path]
        delta = layer.lora_B["mix"].weight @ layer.lora_A["mix"].weight * layer.scaling["mix"]
        expected = theirs.lora_B["mix"].weight @ theirs.lora_A["mix"].weight * theirs.scaling["mix"]
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)
        if how != "svd":  # svd factors are unique only up to sign
            torch.testing.assert_close(layer.lora_A["mix"].weight, theirs.lora_A["mix"].weight)


def test_cat_and_full_rank_svd_are_exact_weighted_sums(folders, tokenizer):
    _, layers = ours(folders, tokenizer, ["a", "c"], "svd", rank=12)
    for layer in layers.values():
        exact = sum(w * layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight for n, w in zip(["a", "c"], WEIGHTS))
        torch.testing.assert_close(layer.lora_B["mix"].weight @ layer.lora_A["mix"].weight, exact, rtol=1e-4, atol=1e-5)


def test_combination_errors_name_the_problem(folders, tokenizer):
    adapted = AdaptedModel(build_model("llama", len(tokenizer)))
    adapted.load_adapter(folders["a"], name="a")
    adapted.load_adapter(folders["c"], name="c")
    for args, message in [((["a", "c"], [1, 1], "x", "linear"), "one rank"), ((["a"], [1, 2], "x", "svd"), "weights"),
                          ((["a", "ghost"], [1, 1], "x", "cat"), "ghost"), ((["a"], [1], "a", "cat"), "already exists"),
                          ((["a"], [float("nan")], "x", "cat"), "finite"), ((["a"], [1], "x", "ties"), "ties")]:
        with pytest.raises(AdapterError, match=message):
            combine_adapters(adapted, *args)


def test_split_weights_reads_the_documented_command_line():
    assert split_weights(["A", "B", "0.5"], ["0.5"]) == (["A", "B"], [0.5, 0.5])
    assert split_weights(["A", "B"], ["0.25,0.75"]) == (["A", "B"], [0.25, 0.75])
    with pytest.raises(AdapterError, match="number"):
        split_weights(["A"], ["half"])


def test_combine_command_writes_a_loadable_adapter(folders, model_dirs, tmp_path, tokenizer):
    out = tmp_path / "combined"
    result = CliRunner().invoke(app, [
        "combine", str(folders["a"]), str(folders["c"]), "--weights", "0.5", "0.5", "--how", "cat", "--out", str(out),
        "--model", str(model_dirs["llama"]),
    ])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((out / "peftkit.json").read_text())
    assert sidecar["combination"]["weights"] == [0.5, 0.5] and sidecar["prompt_format"]["templates"]
    adapted = AdaptedModel(build_model("llama", len(tokenizer)))
    adapted.load_adapter(out, name="combined")
    adapted.load_adapter(folders["a"], name="a")
    adapted.load_adapter(folders["c"], name="c")
    for module in adapted.modules():
        if isinstance(module, LoraLinear):
            exact = 0.5 * module.delta_weight("a") + 0.5 * module.delta_weight("c")
            torch.testing.assert_close(module.delta_weight("combined"), exact, rtol=1e-4, atol=1e-6)


def test_adapter_specs():
    assert parse_adapter_specs(["outcome=runs/a", "challenge=/x/b"]) == {"outcome": Path("runs/a"), "challenge": Path("/x/b")}
    for bad in (["noequals"], ["=path"], ["bad name=p"], ["a=1", "a=2"]):
        with pytest.raises(Exception, match="--adapter"):
            parse_adapter_specs(bad)


def test_serve_command_builds_the_server_it_was_asked_for(folders, model_dirs, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    seen = {}

    def fake_run(asgi_app, host, port, log_level, timeout_graceful_shutdown):  # the real uvicorn runs in test_serve_http.py
        seen.update(host=host, port=port, drain=timeout_graceful_shutdown)
        with TestClient(asgi_app) as client:
            headers = {"Authorization": "Bearer cli-key"}
            seen["models"] = [m["id"] for m in client.get("/v1/models", headers=headers).json()["data"]]
            seen["completion"] = client.post("/v1/completions", headers=headers,
                                             json={"model": "outcome", "prompt": "We", "max_tokens": 3, "temperature": 0}).status_code
            seen["admin"] = client.post("/admin/adapters", headers=headers, json={"name": "b", "path": "b"}).status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("PEFTKIT_API_KEY", "cli-key")
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dirs["llama"]), "--served-model-name", "tiny",
                                      "--adapter", f"outcome={folders['a']}", "--merge", "--port", "8123", "--drain-seconds", "3"])
    assert result.exit_code == 0, result.output
    assert seen == {"host": "127.0.0.1", "port": 8123, "drain": 3.0, "models": ["outcome"], "completion": 200, "admin": 403}
