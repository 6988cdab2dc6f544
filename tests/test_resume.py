"""A run killed with SIGKILL mid-training and resumed with `peftkit train --resume` ends with the
same weights, bit for bit, as a run that was never interrupted (dropout on, so the RNG must be
restored too; data order, optimizer and scheduler likewise), in fp32 and with a bf16 base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import subprocess_env, tiny_run_config, torch_threads
from peftkit.config import config_from_dict
from peftkit.train import run_training
from peftkit.train.checkpoint import list_checkpoints

# The run to be killed slows down after its step-4 checkpoint, so the kill lands mid-run.
SLOW_RUN = """
import sys, time
from peftkit.config import load_config
from peftkit.train import run_training

def slow(record):
    if record["step"] >= 4:
        time.sleep(0.5)

run_training(load_config(sys.argv[1]), on_step=slow)
"""


def config(model_dirs, data_file, out, precision) -> dict:
    raw = tiny_run_config(model_dirs["llama"], data_file, out, epochs=3, save_every=2, eval_every=3, keep_checkpoints=2, lr=2e-2,
                          precision=precision)
    raw["lora"]["dropout"] = 0.1
    raw["generate"]["num_samples"] = 0
    return raw


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_then_resume_is_bit_identical(model_dirs, data_file, tmp_path, precision):
    killed_out, reference_out = tmp_path / "killed", tmp_path / "reference"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(config(model_dirs, data_file, killed_out, precision)))
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)

    child = subprocess.Popen([sys.executable, str(script), str(cfg_file)], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (killed_out / "checkpoints" / "step-4").is_dir():
        assert child.poll() is None, child.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (killed_out / "adapter").exists(), "killed before the end"
    steps_logged = [json.loads(line)["step"] for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    assert 4 <= max(steps_logged) < 15

    resumed = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(cfg_file), "--resume"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stderr

    with torch_threads():  # the subprocesses' thread count
        reference = run_training(config_from_dict(config(model_dirs, data_file, reference_out, precision)))
    mine, theirs = load_file(str(killed_out / "adapter/adapter_model.safetensors")), load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys() and len(mine) > 0
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key

    records = [json.loads(line) for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["step"] for r in records if "loss" in r]
    assert losses == list(range(1, 16)), "each step logged once across the kill"
    reference_records = [json.loads(line) for line in (reference_out / "metrics.jsonl").read_text().splitlines()]
    reference_losses = [r["loss"] for r in reference_records if "loss" in r]
    assert [r["loss"] for r in records if "loss" in r] == reference_losses
    assert [p.name for p in list_checkpoints(killed_out / "checkpoints")] == ["step-14", "step-15"], "keep the last 2"
