"""Faults a long run meets: SIGINT / SIGTERM, a full disk, a NaN loss, a merge that overflows.
Each ends with a message (no traceback), leaves the newest checkpoint whole, and a resume
continues bit-identically with an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import peftkit.adapters
from conftest import build_model, subprocess_env, tiny_run_config, torch_threads
from peftkit import AdapterError, LoraConfig, attach
from peftkit.cli import main as cli_main
from peftkit.config import config_from_dict
from peftkit.errors import Interrupted, PeftkitError
from peftkit.train import checkpoint, loop, run_training
from peftkit.train.checkpoint import WEIGHTS_FILE, list_checkpoints
from peftkit.train.interrupt import stop_on_signals
from test_crash_resume import assert_bit_identical

STEPS = 8


def run_config(model_dirs: dict, data_file: Path, out: Path, **train: Any) -> dict:
    raw = tiny_run_config(model_dirs["llama"], data_file, out, **{"max_steps": STEPS, "save_every": 2, "keep_checkpoints": 2,
                                                                  "lr": 2e-2, **train})
    raw["lora"]["dropout"] = 0.1
    raw["generate"]["num_samples"] = 0
    return raw


def train(raw: dict, resume: bool = False) -> Path:
    with torch_threads():
        return run_training(config_from_dict(raw), resume=resume).adapter_dir


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """24 prompt/response rows (like conftest's), shared by the module's runs."""
    path = tmp_path_factory.mktemp("faults") / "train.jsonl"
    path.write_text("".join(json.dumps({"abstract": f"This paper studies problem {i}. We propose a method. Results show gains.",
                                        "summary": f"The method gives gains on problem {i}."}) + "\n" for i in range(24)))
    return path


@pytest.fixture(scope="module")
def reference_adapter(model_dirs, data_file, tmp_path_factory) -> Path:
    """The uninterrupted run's adapter folder."""
    return train(run_config(model_dirs, data_file, tmp_path_factory.mktemp("reference") / "run"))


@pytest.fixture(scope="module")
def reference(reference_adapter) -> dict[str, torch.Tensor]:
    return load_file(str(reference_adapter / "adapter_model.safetensors"))


def leftovers(out: Path) -> list[Path]:
    return [p for folder in (out, out / "checkpoints") if folder.is_dir() for p in folder.glob(".*") if p.suffix in (".tmp", ".old")]


# -- SIGINT / SIGTERM ----------------------------------------------------------------------------

# The CLI, with each step slowed down so the signal lands mid-run.
SLOW_CLI = """
import sys, time
import peftkit.train.loop as loop
from peftkit.cli import main

original = loop.accumulate_gradients

def slow(*args, **kwargs):
    time.sleep(0.3)
    return original(*args, **kwargs)

loop.accumulate_gradients = slow
main(["train", sys.argv[1]])
"""


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_bit_identically(model_dirs, data_file, tmp_path, reference):
    """The whole CLI in a subprocess: the signal arrives while a step runs."""
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    raw = run_config(model_dirs, data_file, tmp_path / "run", save_every=0)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    child = subprocess.Popen([sys.executable, str(script), str(cfg_file)], env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    metrics, deadline = Path(raw["output_dir"]) / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # step 2 is done
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stdout + stderr
    saved = list_checkpoints(Path(raw["output_dir"]) / "checkpoints")
    assert len(saved) == 1, "save_every=0: the signal's checkpoint is the only one"
    step = int(saved[0].name.split("-")[1])
    assert 2 <= step < STEPS
    message, compact = " ".join(stderr.split()), "".join(stderr.split())  # rich wraps long lines
    assert f"SIGTERM: stopped after step {step} of {STEPS}" in message and str(saved[0]) in compact
    assert "--resume" in message
    assert not (Path(raw["output_dir"]) / "adapter").exists()

    adapter = train(raw, resume=True)
    assert_bit_identical(load_file(str(adapter / "adapter_model.safetensors")), reference)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT as in a terminal (a background job, as CI may run pytest, starts with SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def interrupt_at_step(step: int, times: int = 1):
    """An on_step hook: Ctrl-C (`times` times) once `step` is done."""
    def hook(record: dict) -> None:
        if record["step"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_ctrl_c_finishes_the_step_saves_and_resumes_bit_identically(model_dirs, data_file, tmp_path, reference, ctrl_c_raises):
    raw = run_config(model_dirs, data_file, tmp_path / "run")  # checkpoints at 2, 4, ...
    with torch_threads(), pytest.raises(Interrupted) as caught:
        run_training(config_from_dict(raw), on_step=interrupt_at_step(3))
    assert caught.value.exit_code == 130
    assert [p.name for p in list_checkpoints(Path(raw["output_dir"]) / "checkpoints")] == ["step-2", "step-3"]
    assert "SIGINT: stopped after step 3 of 8; checkpoint saved to" in str(caught.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is put back"

    adapter = train(raw, resume=True)
    assert_bit_identical(load_file(str(adapter / "adapter_model.safetensors")), reference)


def test_a_second_ctrl_c_stops_at_once(model_dirs, data_file, tmp_path, ctrl_c_raises):
    raw = run_config(model_dirs, data_file, tmp_path / "run", save_every=0)
    with torch_threads(), pytest.raises(KeyboardInterrupt):
        run_training(config_from_dict(raw), on_step=interrupt_at_step(3, times=2))
    assert not list_checkpoints(Path(raw["output_dir"]) / "checkpoints")


def test_a_signal_the_process_ignores_stays_ignored():
    """nohup and background jobs ignore SIGINT on purpose; training must not start catching it."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is stop
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)


# -- a full disk ---------------------------------------------------------------------------------


def disk_full_safetensors(calls_before_failing: int):
    """safetensors' save_file that fails like a full disk does (measured on a full tmpfs)."""
    real = checkpoint.save_file
    calls = [0]

    def save_file(tensors: dict, filename: str, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] <= calls_before_failing:
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\x00" * 16)  # a partial file, as a real full disk leaves
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_file


def disk_full_torch_save(obj: Any, f: Any) -> None:
    """torch.save into a Python file on a full disk: RuntimeError, the OSError(ENOSPC) as its context."""
    f.write(b"PK\x03\x04")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("failing", ["checkpoint weights", "checkpoint optimizer", "final adapter"])
def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_to_resume(model_dirs, data_file, tmp_path, reference, monkeypatch, failing):
    raw = run_config(model_dirs, data_file, tmp_path / "run")
    out = Path(raw["output_dir"])
    if failing == "checkpoint weights":  # the 2nd checkpoint (step 4) fails
        monkeypatch.setattr(checkpoint, "save_file", disk_full_safetensors(calls_before_failing=1))
    elif failing == "checkpoint optimizer":
        real_save = torch.save
        monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: (disk_full_torch_save if "step-4" in f.name else real_save)(obj, f))
    else:
        monkeypatch.setattr(peftkit.adapters, "save_file", disk_full_safetensors(calls_before_failing=0))
    kept = "step-8" if failing == "final adapter" else "step-2"

    with pytest.raises(PeftkitError) as caught:
        train(raw)
    message = str(caught.value)
    assert "no space left on device" in message and "free space and resume" in message and "--resume" in message
    assert f"checkpoints/{kept}, is intact" in message
    assert not leftovers(out), "the half-written temp folder is removed"
    assert not (out / "adapter").exists()
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == kept and load_file(str(newest / WEIGHTS_FILE))

    monkeypatch.undo()  # space freed
    adapter = train(raw, resume=True)
    assert_bit_identical(load_file(str(adapter / "adapter_model.safetensors")), reference)


def test_the_cli_reports_a_full_disk_with_exit_2_and_no_traceback(model_dirs, data_file, tmp_path, monkeypatch, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(run_config(model_dirs, data_file, tmp_path / "run")))
    monkeypatch.setattr(checkpoint, "save_file", disk_full_safetensors(calls_before_failing=0))
    with torch_threads(), pytest.raises(SystemExit) as exited:
        cli_main(["train", str(cfg_file)])
    assert exited.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no space left on device while writing to" in err
    assert "no checkpoint was written yet; free space and run again" in err
    assert "Traceback" not in err


# -- a NaN loss ----------------------------------------------------------------------------------


def test_a_nan_loss_stops_with_the_step_and_examples_named(model_dirs, data_file, tmp_path, monkeypatch, capsys):
    """Step 5's loss and gradients turn NaN (as a poisoned row or an overflow would make them)."""
    raw = run_config(model_dirs, data_file, tmp_path / "run", save_every=1)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    original, calls = loop.accumulate_gradients, [0]

    def poisoned(forward, examples, *args: Any, **kwargs: Any):
        result = original(forward, examples, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 5:
            for p in forward.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            result.loss = float("nan")
        return result

    monkeypatch.setattr(loop, "accumulate_gradients", poisoned)
    with torch_threads(), pytest.raises(SystemExit) as exited:
        cli_main(["train", str(cfg_file)])
    assert exited.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "loss nan at step 5 (epoch 0, batch 4; training examples #" in err, err
    assert "Summarize:" in err, "each named example is shown, so its row can be found"
    assert "the weights were not updated and the last good checkpoint is" in err
    assert f"{tmp_path}/run/checkpoints/step-4." in "".join(err.split())
    assert "Traceback" not in err
    out = Path(raw["output_dir"])
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == "step-4" and json.loads((newest / checkpoint.STATE_FILE).read_text())["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(str(newest / WEIGHTS_FILE)).values())
    assert not (out / "adapter").exists()


# -- a safe merge --------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", ["nan in B", "finite factors whose product overflows"])
def test_a_merge_that_would_put_nan_or_inf_into_the_base_is_refused(poison):
    adapted = attach(build_model("llama", 400), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    layer = adapted.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        if poison == "nan in B":
            layer.lora_B["default"].weight[0, 0] = float("nan")
        else:
            layer.lora_A["default"].weight.fill_(1e30)
            layer.lora_B["default"].weight.fill_(1e30)
    base = {n: p.detach().clone() for n, p in adapted.named_parameters() if "lora_" not in n}
    ids = torch.tensor([[5, 6, 7, 8]])
    with adapted.disable_adapter():
        base_logits = adapted(input_ids=ids).logits

    for merge in (adapted.merge_adapter, adapted.merge_and_unload):
        with pytest.raises(AdapterError, match=r"NaN/Inf in model\.layers\.1\.self_attn\.v_proj\.weight.*nothing was merged"):
            merge()
        after = {n: p for n, p in adapted.named_parameters() if "lora_" not in n}
        assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) for n in base), "base untouched"
        assert not any(getattr(m, "merged", False) for m in adapted.modules())
        with adapted.disable_adapter():
            assert torch.equal(adapted(input_ids=ids).logits, base_logits)


def test_any_command_reports_a_full_disk_with_exit_2(reference_adapter, tmp_path, monkeypatch, capsys):
    """`peftkit merge` writing its merged checkpoint onto a full disk: a message, nothing half-written."""
    from transformers import PreTrainedModel

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(SystemExit) as exited:
        cli_main(["merge", str(reference_adapter), "--out", str(tmp_path / "merged")])
    assert exited.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no space left on device" in err and "free space and run the command again" in err and "Traceback" not in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".merged", "merged"))]


def test_peftkit_merge_refuses_an_adapter_whose_merge_is_not_finite(reference_adapter, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(reference_adapter, broken)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    for key in [k for k in weights if ".layers.0.self_attn.q_proj.lora_" in k]:
        weights[key].fill_(1e30)  # finite, so the folder loads; B @ A overflows to Inf
    save_file(weights, str(broken / "adapter_model.safetensors"))
    with pytest.raises(SystemExit) as exited:
        cli_main(["merge", str(broken), "--out", str(tmp_path / "merged")])
    assert exited.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "gives NaN/Inf in model.layers.0.self_attn.q_proj.weight, so nothing was merged" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()
