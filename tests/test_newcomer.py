"""What a newcomer meets, run as a user runs it: `peftkit` in a subprocess whose output is captured, so
stdout is a pipe, not a terminal (as in `make demo > demo.log`), at rich's default width of 80 columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SUBPROCESS_THREADS, tiny_run_config

LONG = "a rather long sentence about the method, its data, and what the experiments found"


def peftkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(SUBPROCESS_THREADS))
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dirs):
    """`peftkit train CONFIG --set data.train=FILE --set data.prompt=...{abstract}`, where CONFIG names the built-in
    dataset: the file must replace it. 24 rows: 18 train, 3 validation, 3 test (all shown as samples)."""
    root = tmp_path_factory.mktemp("newcomer")
    rows = [{"abstract": f"This paper studies problem {i}, {LONG}.", "summary": f"Gains on problem {i}, {LONG}."}
            for i in range(24)]
    data = root / "papers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_run_config(model_dirs["llama"], data, root / "run", epochs=2, precision="fp32", log_every=1)
    cfg["data"] = {**cfg["data"], "dataset": "aclsum/outcome", "max_length": 256}
    del cfg["data"]["train"], cfg["data"]["template"]
    # a tiny random model answers "\n\n\n..." (empty once stripped): forbidding repeats makes it say something
    cfg["generate"] = {"max_new_tokens": 12, "num_samples": 3, "no_repeat_ngram_size": 1}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = peftkit("train", str(root / "cfg.yaml"), "--set", f"data.train={data}", "--set",
                     "data.prompt=Summarize: {abstract}", "--set", "train.lr=1e-2")
    assert result.returncode == 0, result.stderr + result.stdout
    return root, result


def markdown_rows(text: str, first_cell: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_1_train_summary_is_a_markdown_table_in_a_pipe(run):
    root, result = run
    out = result.stdout
    assert "### run summary" in out and "| field | value |" in out
    adapter_row = markdown_rows(out, "adapter")
    assert adapter_row == [f"| adapter | {root / 'run' / 'adapter'} |"], "one line, not folded into 80 columns"
    samples = [line for line in out.splitlines() if line.startswith("| Gains on problem")]
    assert len(samples) == 3 and all(LONG in line and line.count(" | ") == 2 for line in samples)
    assert "┃" not in out and "│" not in out, "no box-drawing table in a log"


def test_2_progress_lines_in_a_pipe(run):
    _, result = run
    lines = [line for line in result.stdout.splitlines() if line.startswith("train ")]
    assert lines[0] == "train 0/10: starting", lines
    assert lines[-1].startswith("train 10/10: loss ") and "tok/s" in lines[-1] and "ETA 0:00" in lines[-1]
    assert len(lines) >= 3, "several lines, not only the final state"
    assert "nan" not in result.stdout


def test_2_progress_lines_every_n_steps_or_m_seconds():
    from peftkit.train.logs import StepLog

    now = [0.0]
    lines: list[str] = []
    progress = StepLog(lines.append, every_steps=50, every_seconds=30.0, clock_fn=lambda: now[0])
    bar = progress.add_task("train", total=200, completed=100, loss=float("nan"), tps=0.0)  # a resumed run
    for step in range(101, 201):
        now[0] += 2.0  # 2 s per step: a line every 15 steps (30 s) comes before every 50 steps
        progress.update(bar, completed=step, loss=1.0 / step, tps=800.0)
    assert lines[0] == "train 100/200: starting"
    assert lines[1] == "train 115/200: loss 0.0087, 800 tok/s, elapsed 0:30, ETA 2:50", "ETA from this run's own pace"
    assert [line.split(":")[0] for line in lines[2:]] == [f"train {s}/200" for s in (130, 145, 160, 175, 190, 200)]


def test_2_the_terminal_bar_says_starting_before_the_first_step():
    from rich.progress import Progress

    from peftkit.cli import _LossColumn

    progress = Progress()
    bar = progress.add_task("train", total=26, loss=float("nan"), tps=0.0)
    assert _LossColumn().render(progress.tasks[0]).plain == "starting"
    progress.update(bar, completed=1, loss=2.5, tps=149.0)
    assert _LossColumn().render(progress.tasks[0]).plain == "loss 2.5000  149 tok/s"


def test_4_a_file_replaces_the_built_in_dataset(run):
    root, result = run
    data = root / "papers.jsonl"
    assert f"data {data} ->" in result.stdout and "aclsum" not in result.stdout
    recorded = yaml.safe_load((root / "run" / "config.yaml").read_text())["data"]
    assert recorded["dataset"] is None and recorded["train"] == str(data)


def test_4_a_dataset_and_a_file_given_together_is_an_error(tmp_path):
    result = peftkit("train", "--set", "data.train=papers.jsonl", "--set", "data.dataset=aclsum/outcome", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--set: 1 problem(s)" in result.stderr and "remove data.dataset" in result.stderr


def test_5_a_template_with_braces_is_taken_literally(run):
    root, _ = run
    sidecar = json.loads((root / "run" / "adapter" / "peftkit.json").read_text())
    assert sidecar["prompt_format"]["templates"] == ["Summarize: {abstract}"]


def test_5_set_problems_are_named_under_set_in_plain_words(tmp_path):
    result = peftkit("train", "--set", "data.prompt={question}", "--set", "train.epochs=abc", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    err = " ".join(result.stderr.split())
    assert "--set: 1 problem(s)" in err and "train.epochs: expected a number, got 'abc'" in err
    assert "defaults" not in err and "data.prompt" not in err, "the template is text, not a YAML mapping"


def test_6_samples_after_training_are_the_answers_eval_gives_1_in_markdown(run):
    from peftkit.eval.report import markdown_table

    root, result = run
    assert "decoded with: greedy, at most 12 new tokens, no repeated 1-grams, fp32 weights; `peftkit eval` by default: " \
           "greedy, at most 60 new tokens, fp32 weights, so its answers can differ" in " ".join(result.stdout.split())
    out = root / "eval"
    evaluated = peftkit("eval", "--adapter", f"tuned={root / 'run' / 'adapter'}", "--max-new-tokens", "12",
                        "--no-repeat-ngram-size", "1", "--out", str(out))
    assert evaluated.returncode == 0, evaluated.stderr + evaluated.stdout
    task = json.loads((out / "results.json").read_text())["tasks"]["papers"]
    outputs = task["outputs"]
    assert all(outputs["tuned"]) and all(outputs["base"]), "real answers, not empty strings"
    shown = markdown_table((["reference", "base (adapter disabled)", "tuned"],
                            [list(row) for row in zip(task["references"], outputs["base"], outputs["tuned"])]))
    assert shown in result.stdout, "the samples printed after training are eval's answers, row for row"
    # item 1 again: eval's score table, in the same pipe
    assert "### papers (test, 3 examples)" in evaluated.stdout
    assert len(markdown_rows(evaluated.stdout, "base")) == 1 and "┃" not in evaluated.stdout


def test_7_train_help_shows_own_data(tmp_path):
    result = peftkit("train", "--help", cwd=tmp_path)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "--set data.train=papers.jsonl --set data.prompt={abstract} --set data.response=summary" in text
    assert '{"abstract": "We study ...", "summary": "We find ..."}' in text and 'section "Data format"' in text


def test_7_eval_recorded_alone_takes_model_and_task_from_the_file(run):
    root, _ = run
    first = root / "eval-first"
    made = peftkit("eval", "--adapter", f"lora={root / 'run' / 'adapter'}", "--no-base", "--dataset", "aclsum/outcome",
                   "--limit", "2", "--max-new-tokens", "4", "--out", str(first))
    assert made.returncode == 0, made.stderr
    again = peftkit("eval", "--recorded", str(first / "results.json"), "--max-new-tokens", "4", "--out", str(root / "eval-again"))
    assert again.returncode == 0, again.stderr + again.stdout
    assert "### aclsum/outcome (test, 2 examples)" in again.stdout
    assert len(markdown_rows(again.stdout, "base")) == 1 and len(markdown_rows(again.stdout, "lora (recorded)")) == 1


def test_8_the_default_config_comments_agree_with_the_code():
    from peftkit.methods.registry import METHODS

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "default.yaml").read_text()
    listed = next(line for line in text.splitlines() if line.startswith("method:")).split("#", 1)[1].split("|")
    assert [m.strip() for m in listed] == list(METHODS)
    assert "minutes on" not in text and "~" not in text, "times are measured per machine in the README, not guessed here"
    section = text.split("README's \"", 1)[1].split('"', 1)[0]
    assert f"## {section}" in (root / "README.md").read_text()


def test_9_generate_takes_the_repetition_options(run):
    root, _ = run
    # without a repetition option this tiny model answers only newlines, which print as an empty answer
    result = peftkit("generate", "--adapter", str(root / "run" / "adapter"), "--max-new-tokens", "8",
                     "--no-repeat-ngram-size", "1", "--repetition-penalty", "1.2", "This paper studies problem 3.")
    assert result.returncode == 0, result.stderr
    answer = next(line for line in result.stdout.splitlines() if line.startswith("tuned:"))
    assert answer.removeprefix("tuned:").strip()
