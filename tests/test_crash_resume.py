"""Nothing lost: a run SIGKILLed at many points (during checkpoint writes too) and resumed each time
ends bit-identical to an uninterrupted run, and no checkpoint on disk is ever half-written
(tests/crash_harness.py does the killing, in one subprocess). Also: the same config and seed give
the same adapter, bit for bit, in two separate processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import subprocess_env, tiny_run_config, torch_threads
from peftkit.config import config_from_dict
from peftkit.train import run_training
from peftkit.train.checkpoint import WEIGHTS_FILE, list_checkpoints

HARNESS = Path(__file__).with_name("crash_harness.py")
KILLS = 20


def crash_config(model_dir: Path, data_file: Path, out: Path) -> dict:
    """10 steps, a checkpoint after every one, validation (and `best/` rewrites) every other step."""
    raw = tiny_run_config(model_dir, data_file, out, epochs=2, save_every=1, eval_every=2, keep_checkpoints=2, lr=2e-2)
    raw["lora"]["dropout"] = 0.1  # the RNG state must survive every kill too
    raw["generate"]["num_samples"] = 0
    return raw


@pytest.fixture(scope="module")
def harness(model_dirs, tmp_path_factory) -> dict:
    """The reference run and the killed-and-resumed run, both forked from one harness process."""
    root = tmp_path_factory.mktemp("crash")
    data_file = root / "train.jsonl"
    data_file.write_text("".join(json.dumps({"abstract": f"This paper studies problem {i}. We propose a method.",
                                             "summary": f"The method gives gains on problem {i}."}) + "\n" for i in range(24)))
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(crash_config(model_dirs["llama"], data_file, root / "unused")))
    report = root / "report.json"
    done = subprocess.run([sys.executable, str(HARNESS), str(cfg_file), str(root / "reference"), str(report), "0", str(KILLS)],
                          check=False, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {**json.loads(report.read_text()), "root": root, "data_file": data_file}


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_bit_identical(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert mine.keys() == theirs.keys() and len(mine) > 0
    for key, tensor in mine.items():
        assert torch.equal(tensor, theirs[key]), key


def test_sigkill_at_many_points_then_resume_is_bit_identical(harness):
    attempts = harness["attempts"]
    kills = [a for a in attempts if a["killed"]]
    print(f"\nkill points survived: {len(kills)} ({sum(a['kill_at_event'] is not None for a in kills)} at writer events, "
          f"{sum(a['leftovers'] > 0 for a in kills)} left a half-written temp behind, {sum(a['between_renames'] > 0 for a in kills)} "
          f"a folder between its two renames); resumed from steps {[a['resumed_from'] for a in attempts]}; {len(attempts)} processes, "
          f"{harness['seconds']:.1f} s")
    assert len(kills) >= 15, attempts
    assert any(a["kill_at_event"] is not None for a in kills) and any(a["delay_s"] is not None for a in kills)
    assert any(a["leftovers"] for a in kills), "no kill landed inside a write: the harness tests nothing there"
    assert any(a["between_renames"] for a in kills), "no kill landed between the two renames that replace a folder"
    assert attempts[-1]["exit_code"] == 0 and not attempts[-1]["leftovers"], "the finished run tidied the temps away"

    reference, killed = harness["root"] / "reference", Path(harness["killed_out"])
    assert_bit_identical(adapter_weights(killed), adapter_weights(reference))
    assert_bit_identical(load_file(str(killed / "best" / WEIGHTS_FILE)), load_file(str(reference / "best" / WEIGHTS_FILE)))
    last = [p.name for p in list_checkpoints(killed / "checkpoints")]
    assert last == [p.name for p in list_checkpoints(reference / "checkpoints")]
    assert_bit_identical(load_file(str(killed / "checkpoints" / last[-1] / WEIGHTS_FILE)),
                         load_file(str(reference / "checkpoints" / last[-1] / WEIGHTS_FILE)))

    def losses(out: Path) -> list[tuple[int, float]]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in records if "loss" in r]

    assert losses(killed) == losses(reference), "each step logged once, with the uninterrupted run's loss"


def test_same_seed_gives_the_same_adapter_in_another_process(harness, model_dirs, tmp_path):
    """The harness's reference run (another process) vs this process: bit-identical on CPU, and
    `train.deterministic` (deterministic kernels only) changes nothing there and breaks no op."""
    cfg = crash_config(model_dirs["llama"], harness["data_file"], tmp_path / "here")
    cfg["train"]["deterministic"] = True
    with torch_threads():  # the harness's thread count (README: Determinism)
        result = run_training(config_from_dict(cfg))
    assert not torch.are_deterministic_algorithms_enabled(), "the setting lasts for the run only"
    assert_bit_identical(adapter_weights(result.output_dir), adapter_weights(harness["root"] / "reference"))
