"""The `peftkit` command end to end on a tiny model: train, inspect, generate, merge; user errors exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config


def peftkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dirs):
    from conftest import CORPUS  # noqa: F401  (the tokenizer was trained on it)

    root = tmp_path_factory.mktemp("cli")
    rows = [{"abstract": f"This paper studies problem {i}.", "summary": "Results show gains."} for i in range(16)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_run_config(model_dirs["llama"], data, root / "run", epochs=2)
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = peftkit("train", str(root / "cfg.yaml"), "--set", "train.lr=1e-2")
    assert result.returncode == 0, result.stderr + result.stdout
    return root, result


def test_train_writes_the_run_folder(trained):
    root, result = trained
    run = root / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/peftkit.json", "metrics.jsonl", "config.yaml"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and {"step", "loss", "lr", "tokens_per_s"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"], "the loss went down"
    assert "run summary" in result.stdout and "base vs tuned" in result.stdout
    sidecar = json.loads((run / "adapter/peftkit.json").read_text())
    assert sidecar["prompt_format"]["templates"] == ["Summarize:\n\n{abstract}"]
    assert sidecar["chat_template"] and sidecar["format_version"] == 1


def test_inspect(trained):
    root, _ = trained
    result = peftkit("inspect", str(root / "run/adapter"))
    assert result.returncode == 0, result.stderr
    assert "LORA" in result.stdout and "size on disk" in result.stdout and "all-linear" in result.stdout


def test_generate_uses_the_adapter_template(trained):
    root, _ = trained
    result = peftkit("generate", "--adapter", str(root / "run/adapter"), "--compare", "--max-new-tokens", "6", "This paper studies problem 3.")
    assert result.returncode == 0, result.stderr
    assert "base:" in result.stdout and "tuned:" in result.stdout


def test_merge_writes_a_plain_transformers_checkpoint(trained):
    from transformers import AutoModelForCausalLM

    from peftkit import AdaptedModel

    root, _ = trained
    result = peftkit("merge", str(root / "run/adapter"), "--out", str(root / "merged"))
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    adapted, tokenizer = AdaptedModel.from_pretrained(root / "run/adapter")
    ids = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert (root / "merged" / "tokenizer.json").is_file() and (root / "merged" / "peftkit.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "lora.r=0"], "lora.r: must be at least 1"),
        (["train", "--set", "methd=lora"], "did you mean 'method'"),
        (["train", "missing.yaml"], "config file not found"),
        (["inspect", "/nonexistent/adapter"], "no such adapter or model folder"),
        (["train", "--set", "model=./no/such/folder", "--set", "data.dataset=aclsum/outcome"], "no such folder"),
        (["train", "--set", "data.dataset=null", "--set", "data.train=nope.jsonl"], "data file not found"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(args, message, tmp_path):
    result = peftkit(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr.replace("\n", " ") or message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_adapter_file_exits_2(trained, tmp_path):
    root, _ = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("adapter_config.json", "peftkit.json"):
        (bad / name).write_text((root / "run/adapter" / name).read_text())
    (bad / "adapter_model.safetensors").write_bytes((root / "run/adapter/adapter_model.safetensors").read_bytes()[:100])
    result = peftkit("generate", "--adapter", str(bad), "hello")
    assert result.returncode == 2 and "truncated" in result.stderr and "Traceback" not in result.stderr
