"""`peftkit ui` without a browser: the form from the config dataclasses, validation identical to the CLI's,
path confinement, run status / progress from run folders, access rules, and the UI's bad-request corpus
(tests/bad_inputs/ui/requests.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from test_bad_inputs import assert_message, assert_undamaged, fill, snapshot

from peftkit.config import load_config
from peftkit.errors import ConfigError, PeftkitError
from peftkit.ui import Roots, UiSettings, create_app
from peftkit.ui.form import form_sections, form_to_raw, section_shown
from peftkit.ui.runs import Jobs, progress, run_status, wall_time
from peftkit.ui.server import ui_settings

PAGE = {"X-Peftkit-UI": "1"}
REQUESTS = yaml.safe_load((Path(__file__).parent / "bad_inputs" / "ui" / "requests.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def roots(tmp_path: Path) -> Roots:
    """A project with a data file, a runs folder holding one finished run `done`, and a folder outside both."""
    project, runs = tmp_path / "project", tmp_path / "runs"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text('{"abstract": "We study x.", "summary": "Gains."}\n')
    done = runs / "done"
    (done / "adapter").mkdir(parents=True)
    (done / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (done / "config.yaml").write_text(yaml.safe_dump({"model": "tiny-base", "method": "lora", "train": {"epochs": 1}}))
    (done / "ui-train.json").write_text(json.dumps({"pid": 1, "started": 0.0, "ended": 5.0, "exit_code": 0}))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jsonl").write_text("{}\n")
    (tmp_path / "secret.txt").write_text("not for the browser")
    return Roots(project, runs)


@pytest.fixture
def client(roots: Roots) -> TestClient:
    return TestClient(create_app(UiSettings(roots)), base_url="http://127.0.0.1:7860")  # no lifespan: no child processes


# -- the form ------------------------------------------------------------------------------------------------
def test_form_fields_carry_the_config_docstrings_and_sections_follow_the_method(client):
    sections = {s["name"]: s for s in client.get("/api/form").json()["sections"]}
    rank = next(f for f in sections["lora"]["fields"] if f["key"] == "lora.r")
    assert rank["kind"] == "number" and rank["default"] == "16" and "Rank of the update" in rank["help"]
    method = next(f for f in sections["run"]["fields"] if f["key"] == "method")
    assert method["kind"] == "select" and {"lora", "qlora", "full"} <= set(method["choices"])
    assert sections["quant"]["owner"] == {"by": "method", "values": ["qlora"]}
    assert section_shown("lora", "qlora", "generation") and not section_shown("lora", "bottleneck", "generation")
    assert section_shown("embedding", "lora", "embedding") and not section_shown("embedding", "lora", "generation")
    assert section_shown("train", "full", "generation")
    assert all(f["help"] for s in sections.values() for f in s["fields"]), "every field shows its docstring"
    keys = [f["key"] for s in sections.values() for f in s["fields"]]
    assert "output_dir" not in keys and len(keys) == len(set(keys))


def test_choices_are_the_projects_data_files_and_model_folders(client, roots):
    model = roots.project / "models" / "tiny"
    model.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (model / name).write_text("{}")
    (roots.project / ".venv" / "lib").mkdir(parents=True)
    (roots.project / ".venv" / "lib" / "hidden.jsonl").write_text("{}\n")
    form = client.get("/api/form").json()
    assert form["data_files"] == ["data/train.jsonl"]  # not the model's JSON, not hidden folders, not the runs
    assert form["model_folders"] == ["models/tiny"]
    assert form["adapters"] == [str(roots.runs / "done" / "adapter")]


def test_form_values_parse_like_set_overrides():
    raw = form_to_raw({"lora.r": "8", "data.prompt": "{abstract}", "lora.target_modules": "[q_proj, v_proj]",
                       "train.max_steps": "", "data.packing": True, "quant.bits": "8"})
    assert raw == {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "data": {"prompt": "{abstract}", "packing": True},
                   "train": {"max_steps": None}, "quant": {"bits": 8}}
    assert {f.key for s in form_sections() for f in s.fields} >= {"model", "data.train", "train.lr", "lora.use_dora"}


def test_check_gives_the_cli_message_and_the_yaml_makes_the_same_run(client, roots):
    bad = client.post("/api/check", json={"values": {"lora.r": "0", "train.epochs": "two"}}, headers=PAGE).json()
    with pytest.raises(ConfigError) as cli_error:
        load_config(None, ["lora.r=0", "train.epochs=two"])
    cli_problems = [line for line in str(cli_error.value).splitlines() if line.startswith("  - ")]
    assert not bad["ok"] and cli_problems and all(line in bad["error"] for line in cli_problems)

    good = client.post("/api/check", json={"values": {"lora.r": "8", "train.lr": "1e-3"}, "name": "r8"}, headers=PAGE).json()
    assert good["ok"], good
    written = roots.runs / "cfg.yaml"
    written.write_text(good["yaml"])
    cfg = load_config(written)
    assert (cfg.lora.r, cfg.train.lr, cfg.lora.alpha) == (8, 1e-3, 32.0)
    assert good["command"] == f"peftkit train {roots.runs / 'r8' / 'config.yaml'}"


# -- runs ----------------------------------------------------------------------------------------------------
def _records(steps: list[tuple[int, float]], per_epoch: int) -> list[dict[str, Any]]:
    return [{"step": s, "epoch": s / per_epoch, "loss": 2.0, "lr": 1e-3, "elapsed_s": e} for s, e in steps]


def test_progress_and_eta_count_only_the_current_process_after_a_resume():
    config = {"train": {"epochs": 1}}
    first = progress(config, _records([(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)], per_epoch=8))
    assert first == {"step": 4, "total": 8, "eta_s": pytest.approx(4.0)}
    resumed = progress(config, _records([(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 0.5), (6, 1.0)], per_epoch=8))
    assert resumed == {"step": 6, "total": 8, "eta_s": pytest.approx(1.0)}  # 2 steps in 1 s since the resume
    assert progress({"train": {"max_steps": 3}}, _records([(1, 1.0)], per_epoch=8))["total"] == 3


def test_wall_time_adds_the_processes_before_a_resume(roots):
    run = roots.runs / "r"
    run.mkdir(parents=True)
    records = _records([(1, 1.0), (2, 2.0), (3, 0.5)], per_epoch=8)
    assert wall_time(run, records) == pytest.approx(2.5)
    (run / "ui-train.json").write_text(json.dumps({"pid": 1, "started": 100.0, "ended": 110.0, "exit_code": 0}))
    assert wall_time(run, records) == pytest.approx(12.0)  # the resumed job's 10 s (load included) + 2 s before


@pytest.mark.parametrize("exit_code, adapter, status", [(0, True, "finished"), (130, False, "stopped"), (143, False, "stopped"),
                                                         (2, False, "failed"), (None, False, "failed")])
def test_status_from_the_job_record(roots, exit_code, adapter, status):
    run = roots.runs / "r"
    (run / "adapter" if adapter else run).mkdir(parents=True)
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    (run / "ui-train.json").write_text(json.dumps({"pid": int(dead_pid), "exit_code": exit_code, "started": 0.0}))
    assert run_status(run, Jobs(roots)) == status


def test_a_restarted_ui_finds_a_running_job_by_its_pid_and_stops_it_with_sigint(roots):
    run = roots.runs / "r"
    run.mkdir(parents=True)
    # stands in for `python -m peftkit.ui.runner RUN train ...` (the name is what identifies a runner's pid)
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "peftkit.ui.runner"])
    try:
        (run / "ui-train.json").write_text(json.dumps({"pid": job.pid, "exit_code": None, "started": 0.0}))
        fresh = Jobs(roots)  # a new UI process: no children of its own
        assert run_status(run, fresh) == "running"
        fresh.stop(run)
        assert job.wait(timeout=60) != 0  # KeyboardInterrupt: the signal was SIGINT
        assert run_status(run, fresh) == "failed"  # it recorded no exit code: it did not checkpoint and exit 130
    finally:
        job.kill()


def test_runs_list_and_a_run_started_from_the_command_line(client, roots):
    cli_run = roots.runs / "from-cli"
    (cli_run / "checkpoints" / "step-2").mkdir(parents=True)
    (cli_run / "config.yaml").write_text(yaml.safe_dump({"method": "bottleneck", "task": "generation", "train": {"epochs": 1}}))
    (cli_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records([(1, 1.0), (2, 2.0)], 4))
                                           + json.dumps({"step": 2, "val_loss": 1.5}) + "\n")
    os.utime(cli_run / "metrics.jsonl", (0, 0))  # written long ago: not running
    rows = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    row = rows["from-cli"]
    assert (row["status"], row["method"], row["step"], row["total"], row["best_val_loss"], row["wall_s"]) == \
        ("stopped", "bottleneck", 2, 4, 1.5, 2.0)
    assert rows["done"]["status"] == "finished" and rows["done"]["wall_s"] == 5.0
    detail = client.get("/api/runs/from-cli?since=1&version=0").json()
    assert detail["reset"] and len(detail["records"]) == 3  # a new version sends everything
    again = client.get(f"/api/runs/from-cli?since=3&version={detail['version']}").json()
    assert not again["reset"] and again["records"] == []


# -- access --------------------------------------------------------------------------------------------------
def test_binding_beyond_loopback_needs_a_key_and_the_key_guards_every_request(roots):
    with pytest.raises(PeftkitError, match="pass --api-key"):
        ui_settings(roots.runs, roots.project, "0.0.0.0", None)
    settings = ui_settings(roots.runs, roots.project, "0.0.0.0", "s3cret")
    assert not settings.loopback
    client = TestClient(create_app(settings), base_url="http://10.0.0.5:7860")
    assert client.get("/api/runs").status_code == 401
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    assert client.post("/login", data={"key": "wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/login", data={"key": "s3cret"}, follow_redirects=False).status_code == 303
    assert client.get("/api/runs").status_code == 200  # the login cookie


def test_the_page_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = client.get("/static/app.js").text + page.text + client.get("/static/style.css").text
    assert "http://" not in script.replace("http://www.w3.org/2000/svg", "") and "https://" not in script
    assert client.get("/static/../app.py").status_code == 404


def test_the_ui_process_holds_no_training_serving_or_data_code():
    code = "import sys, peftkit.ui; print(sorted(m for m in sys.modules if m.startswith(('peftkit.train', 'peftkit.tasks', " \
           "'peftkit.serve', 'peftkit.data', 'peftkit.estimate', 'peftkit.eval'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    assert loaded.strip() == "[]"


# -- the bad-request corpus ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", REQUESTS, ids=[c["id"] for c in REQUESTS])
def test_ui_bad_request(case, client, roots):
    places = {"case": "", "model": "", "gpt2": "", "data": "", "adapter": "", "outside": str(roots.runs.parent / "outside")}
    request = fill(case["request"], places)
    request = json.loads(json.dumps(request).replace("{base}", "tiny-base"))
    headers = {**PAGE, **request.get("headers", {})} if request.get("method", "POST") == "POST" else dict(request.get("headers", {}))
    headers = {k: v for k, v in headers.items() if v is not None}
    before = snapshot(roots.project, roots.runs, roots.runs.parent / "outside")
    body = request.get("body")
    r = client.request(request.get("method", "POST"), request["path"], headers=headers, json=request.get("json"),
                       content=body.encode() if body is not None else None)
    assert r.status_code == case["status"], r.text
    assert_message(r.json()["error"], case["expect"])
    assert_undamaged(before, snapshot(roots.project, roots.runs, roots.runs.parent / "outside"), None)
