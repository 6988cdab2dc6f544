"""The same config on 2 processes (torchrun, gloo on CPU) and on 1: the same loss curve.

Tolerance: both runs see the same global batch of 4 and divide by the same global token count,
so the only difference is the order of float32 additions (the gradient all-reduce sums two
partial gradients; one process sums all rows at once). That is ~1e-7 relative per step; Adam
and 5 steps amplify it a little, so losses must agree to 1e-4 relative (a wrong normalisation,
e.g. averaging per-rank means over unequal token counts, moves them by 1e-2 or more).

In bf16 (frozen base in bf16, LoRA weights fp32) the two runs also round different matmul shapes
(each rank batches its own 2 rows, one process all 4), so activations differ by up to one bf16
rounding, u = 2^-8 ~ 3.9e-3 relative. The loss, a mean over ~100 target tokens, stays within u
(measured: 3e-5; a normalisation bug moves it by 1e-2). Adam divides each weight's step by its own
gradient scale, so a weight whose gradient is near zero can step the other way (measured: one
element of 256 off by 3.7e-3 after 5 steps): bf16 runs compare each adapter tensor as a whole, its
relative distance within 2u (measured: at most 2.7e-3, typically 5e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import BF16_UNIT_ROUNDOFF, tiny_run_config
from peftkit.config import config_from_dict
from peftkit.train import run_training


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# bf16 once, with FSDP: sharding a module whose frozen base is bf16 and whose adapters are fp32 is the case
# DDP does not have (bf16 is emulated on AVX2 hosts, so one case keeps the suite fast)
@pytest.mark.parametrize(("kind", "precision"), [("ddp", "fp32"), ("fsdp", "fp32"), ("fsdp", "bf16")])
def test_two_processes_match_one(model_dirs, data_file, tmp_path, kind, precision):
    raw = tiny_run_config(model_dirs["llama"], data_file, tmp_path / "two", epochs=1, lr=2e-2, distributed=kind, save_every=3,
                          precision=precision)
    raw["generate"]["num_samples"] = 0
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "peftkit.cli", "train", str(cfg_file)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("run summary") == 1, "only rank 0 prints"

    raw["output_dir"] = str(tmp_path / "one")
    run_training(config_from_dict(raw))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 5
    loss_rtol = 1e-4 if precision == "fp32" else BF16_UNIT_ROUNDOFF
    for a, b in zip(two, one):
        assert abs(a - b) <= loss_rtol * abs(b), (two, one)
    assert two[-1] < two[0]
    theirs, mine = load_file(str(tmp_path / "two/adapter/adapter_model.safetensors")), load_file(str(tmp_path / "one/adapter/adapter_model.safetensors"))
    assert theirs.keys() == mine.keys()
    for key in mine:
        if precision == "fp32":
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-3, atol=1e-5)
        else:
            assert (theirs[key] - mine[key]).norm() <= 2 * BF16_UNIT_ROUNDOFF * mine[key].norm(), key
    assert (tmp_path / "two/checkpoints/step-3").is_dir() and not list((tmp_path / "two").glob("**/*rank*"))
