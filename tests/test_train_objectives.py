"""The one training loop gives every objective the same guards: the encoder tasks (embedding,
classification) stop on a NaN / Inf loss or gradient BEFORE the optimizer step, finish the step and
checkpoint on SIGINT, and keep the newest checkpoint on a full disk; each resumes bit-identically.
(The token objective's faults: test_faults.py.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_faults import disk_full_safetensors
from test_tasks import bert_dir, encoder_config, labelled_file, pairs_file  # noqa: F401 (fixtures)

from peftkit.config import config_from_dict
from peftkit.errors import Interrupted, PeftkitError
from peftkit.train import checkpoint, loop, run_training
from peftkit.train.checkpoint import WEIGHTS_FILE, list_checkpoints
from peftkit.train.encoders import ClassificationObjective, EmbeddingObjective

STEPS = 6
OBJECTIVE = {"embedding": EmbeddingObjective, "classification": ClassificationObjective}


def run_config(bert_dir, rows_file, out: Path, task: str, **train: Any) -> dict:
    """Two steps per epoch (16 rows, batch 8), checkpoints every 2 steps, fp32 (compared bit for bit)."""
    options = {"max_steps": STEPS, "save_every": 2, "keep_checkpoints": 3, "schedule": "constant", "precision": "fp32", **train}
    return encoder_config(bert_dir, rows_file, out, task, **options)


def adapter_weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def task_rows(request, pairs_file, labelled_file):  # noqa: F811
    """(task, its rows file) for the parametrised task name."""
    return request.param, pairs_file if request.param == "embedding" else labelled_file


@pytest.fixture(scope="module")
def reference(bert_dir, pairs_file, tmp_path_factory):  # noqa: F811
    """The uninterrupted embedding run's adapter weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return adapter_weights(run_training(config_from_dict(run_config(bert_dir, pairs_file, out, "embedding"))))


def poison_step(monkeypatch, task: str, step: int, what: str) -> None:
    """From call `step` of the objective's loss on, the loss is NaN, or (`gradient`) only its gradient."""
    cls = OBJECTIVE[task]
    original, calls = cls.loss, [0]

    def poisoned(self, model, inputs):
        loss_sum, metrics = original(self, model, inputs)
        calls[0] += 1
        if calls[0] < step:
            return loss_sum, metrics
        if what == "loss":
            return loss_sum * float("nan"), metrics
        return loss_sum + torch.sqrt(loss_sum * 0), metrics  # + 0, whose gradient is sqrt'(0) * 0 = inf * 0 = NaN

    monkeypatch.setattr(cls, "loss", poisoned)


def count_optimizer_steps(monkeypatch) -> list[int]:
    """A one-item list counting the run's optimizer.step() calls."""
    taken = [0]
    real_build = loop.build_optimizer

    def build(*args: Any, **kwargs: Any):
        optimizer = real_build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda *_: taken.__setitem__(0, taken[0] + 1))
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", build)
    return taken


@pytest.mark.parametrize("task_rows", ["embedding", "classification"], indirect=True)
@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_stops_before_the_optimizer_step(bert_dir, task_rows, tmp_path, monkeypatch, what):  # noqa: F811
    task, rows_file = task_rows
    raw = run_config(bert_dir, rows_file, tmp_path / "run", task, save_every=1, max_grad_norm=0.0)  # clipping off
    poison_step(monkeypatch, task, step=3, what=what)
    steps_taken = count_optimizer_steps(monkeypatch)
    with pytest.raises(PeftkitError) as caught:
        run_training(config_from_dict(raw))
    assert steps_taken == [2], "the poisoned step never reached optimizer.step()"
    message = str(caught.value)
    expected = "loss nan at step 3" if what == "loss" else "gradient norm nan at step 3"
    assert expected in message and "(epoch 1, batch 0; training examples #" in message, message
    assert "the weights were not updated and the last good checkpoint is" in message and "--resume" in message
    out = Path(raw["output_dir"])
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == "step-2" and str(newest) in message
    assert all(torch.isfinite(t).all() for t in load_file(str(newest / WEIGHTS_FILE)).values())
    assert not (out / "adapter").exists()


@pytest.fixture
def ctrl_c_raises():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_saves_a_checkpoint_and_resumes_bit_identically(bert_dir, pairs_file, tmp_path, reference, ctrl_c_raises):  # noqa: F811
    raw = run_config(bert_dir, pairs_file, tmp_path / "run", "embedding")

    def interrupt(record: dict) -> None:
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as caught:
        run_training(config_from_dict(raw), on_step=interrupt)
    assert caught.value.exit_code == 130 and "SIGINT: stopped after step 3 of 6" in str(caught.value)
    assert [p.name for p in list_checkpoints(Path(raw["output_dir"]) / "checkpoints")] == ["step-2", "step-3"]
    assert_same(adapter_weights(run_training(config_from_dict(raw), resume=True)), reference)


def test_a_full_disk_keeps_the_last_checkpoint_and_resumes_bit_identically(bert_dir, pairs_file, tmp_path, reference, monkeypatch):  # noqa: F811
    raw = run_config(bert_dir, pairs_file, tmp_path / "run", "embedding")
    monkeypatch.setattr(checkpoint, "save_file", disk_full_safetensors(calls_before_failing=1))  # step 4's checkpoint fails
    with pytest.raises(PeftkitError) as caught:
        run_training(config_from_dict(raw))
    message = str(caught.value)
    assert "no space left on device" in message and "checkpoints/step-2, is intact" in message and "--resume" in message
    out = Path(raw["output_dir"])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-2"] and not (out / "adapter").exists()
    monkeypatch.undo()
    assert_same(adapter_weights(run_training(config_from_dict(raw), resume=True)), reference)


def test_every_objective_of_the_loop_has_the_whole_interface():
    """A new entry in loop.OBJECTIVES must bring every method and attribute the loop calls."""
    import inspect

    from peftkit.train.objectives import Objective, StepObjective

    members = {name for proto in (Objective, StepObjective) for name in [*vars(proto), *proto.__annotations__]
               if not name.startswith("_")}
    assert {"prepare", "epoch_batches", "micro_batches", "loss", "validate", "save", "report", "units", "count_unit"} <= members
    for task, cls in loop.OBJECTIVES.items():
        missing = sorted(name for name in members if not hasattr(cls, name))
        assert not missing, f"{task}: {cls.__name__} lacks {missing}"
        for name in members:
            if inspect.isfunction(getattr(Objective, name, None)):
                assert callable(getattr(cls, name)), (task, name)
