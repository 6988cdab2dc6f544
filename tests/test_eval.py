"""Evaluation end to end on tiny models: systems over one base, generation, multiple choice, forgetting, report, sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from peftkit.config import config_from_dict
from peftkit.errors import DataError, PeftkitError
from peftkit.eval.evaluate import GenerationSettings, generate_outputs, run_evaluation
from peftkit.eval.forgetting import forgetting_table, mean_change
from peftkit.eval.metrics import first_line, text_metrics
from peftkit.eval.multiple_choice import McQuestion, encode_question, mc_accuracy, option_logprobs, read_mc_file
from peftkit.eval.report import markdown_table, write_report
from peftkit.eval.sweep import grid, run_sweep
from peftkit.eval.systems import SystemPool, describe_systems
from peftkit.eval.tasks import CHATTERBOT, chatterbot_task, task_from_run

MC_FILE = Path(__file__).parent / "data" / "mc_general.jsonl"
SETTINGS = GenerationSettings(max_new_tokens=5, batch_size=2)


def write_rows(path: Path, count: int = 24) -> Path:
    rows = [{"abstract": f"This paper studies problem {i}. We propose a method.", "summary": f"Results show gains on problem {i}."}
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """A tiny LoRA run and a tiny full fine-tuning run on the same data."""
    from peftkit.train import run_training

    root = tmp_path_factory.mktemp("eval-runs")
    data = write_rows(root / "train.jsonl")
    out = {}
    for method, lr in (("lora", 1e-2), ("full", 1e-3)):
        raw = tiny_run_config(model_dirs["llama"], data, root / method, epochs=1, lr=lr)
        raw["method"] = method
        raw["generate"]["num_samples"] = 0
        out[method] = run_training(config_from_dict(raw)).adapter_dir
    return out


def test_systems_are_named_and_described(runs):
    systems = describe_systems([runs["lora"], runs["full"]], include_base=True)
    assert [(s.name, s.kind) for s in systems] == [("base", "base"), ("lora", "adapter"), ("full", "full")]
    assert systems[1].train_seconds is not None and systems[1].loss_curve
    assert systems[2].trainable_pct == 100.0 and systems[0].trainable_pct == 0.0
    named = describe_systems([f"tuned={runs['lora']}", runs["lora"]], include_base=False)
    assert [s.name for s in named] == ["tuned", "lora"] and named[0].path == runs["lora"]
    with pytest.raises(PeftkitError, match="taken"):
        describe_systems([f"base={runs['lora']}"], include_base=True)


def test_pool_loads_the_base_once_and_switches_adapters(runs, model_dirs):
    from peftkit import AdaptedModel

    systems = describe_systems([runs["lora"]], include_base=True)
    pool = SystemPool(systems, device="cpu")
    task = task_from_run(systems[1].meta, limit=4)
    with pool.use(systems[0]) as base:
        base_model = base.model
        base_out = generate_outputs(base, task.format, task.rows, SETTINGS)
    with pool.use(systems[1]) as tuned:
        assert tuned.model is base_model, "the adapter is attached to the already loaded base"
        tuned_out = generate_outputs(tuned, task.format, task.rows, SETTINGS)
    reference, tokenizer = AdaptedModel.from_pretrained(runs["lora"])
    assert systems[1].trainable_pct == pytest.approx(100 * reference.trainable_counts()[0] / reference.trainable_counts()[1])
    loaded = SystemPool(describe_systems([], include_base=True, model=str(model_dirs["llama"])), device="cpu")
    with loaded.use(loaded.systems[0]) as plain:
        assert generate_outputs(plain, task.format, task.rows, SETTINGS) == base_out
    from peftkit.artifacts import load_artifact

    assert load_artifact(runs["lora"]).generate(task.rows, max_new_tokens=5) == tuned_out


def test_generation_order_does_not_change_outputs(runs):
    systems = describe_systems([runs["lora"]], include_base=False)
    task = task_from_run(systems[0].meta, limit=4)
    pool = SystemPool(systems, device="cpu")
    with pool.use(systems[0]) as loaded:
        batched = generate_outputs(loaded, task.format, task.rows, SETTINGS)
        one_by_one = [generate_outputs(loaded, task.format, [row], SETTINGS)[0] for row in task.rows]
    assert batched == one_by_one


def peftkit(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run the CLI in this process (no interpreter start-up): (exit code, stdout + stderr)."""
    from peftkit.cli import main

    monkeypatch.setattr(sys, "argv", ["peftkit", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_eval_writes_the_report(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    args = ["eval", "--adapter", str(runs["lora"]), "--adapter", str(runs["full"]), "--limit", "3",
            "--max-new-tokens", "4", "--held-out", CHATTERBOT, "--held-out-limit", "2", "--mc", str(MC_FILE), "--out", str(out)]
    code, output = peftkit(args, monkeypatch, capsys)
    assert code == 0, output
    assert "ROUGE-L" in output and "report.html" in output
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["systems"]] == ["base", "lora", "full"]
    (primary,) = [name for name, t in results["tasks"].items() if t["primary"]]
    task = results["tasks"][primary]
    assert task["n"] == 3 and task["split"] == "test"
    for system, outputs in task["outputs"].items():
        expected = text_metrics([first_line(o) for o in outputs], task["references"])
        assert task["scores"][system]["rougeL"]["value"] == pytest.approx(expected["rougeL"]["value"])
    assert all(v in (0.0, None) for v in task["change_vs_base_pct"]["base"].values())
    assert set(results["forgetting"]) == {CHATTERBOT, "multiple_choice"}
    assert set(results["forgetting"][CHATTERBOT]) == {"lora", "full"}
    assert results["tasks"][CHATTERBOT]["n"] == 2 and not results["tasks"][CHATTERBOT]["primary"]
    assert results["multiple_choice"]["n"] == 40
    assert len(task["samples"]) == 3 and set(task["samples"][0]["outputs"]) == {"base", "lora", "full"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # score bars, loss curves, forgetting
    assert html.count("<table") == html.count("</table>") == 5  # scores, forgetting, choices, 2 side by side
    assert html.index("Side by side: train") < html.index("Side by side: chatterbot"), "the scored task comes first"
    markdown = (out / "report.md").read_text()
    assert "## Side by side" in markdown and "Δ ROUGE-L" in markdown
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["eval", "--no-base"], "nothing to evaluate"),
    (["eval", "--model", "/no/such/folder", "--held-out", "nope"], "not built in"),
    (["eval", "--adapter", "/no/such/adapter"], "no such adapter"),
    (["eval", "--model", "/no/such/folder", "--recorded", "full=/no/such/results.json"], "cannot read"),
    (["eval", "--model", "/no/such/folder", "--recorded", "/no/such/results.json"], "cannot read"),  # a bare FILE: all its systems
])
def test_cli_eval_user_errors_exit_2(args, message, monkeypatch, capsys):
    code, output = peftkit(args, monkeypatch, capsys)
    assert code == 2, output
    assert message in output


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_option_logprobs_match_unpadded_forward(kind, model_dirs, tokenizer):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    model = cls.from_pretrained(model_dirs[kind]).eval()
    question = McQuestion("What is frozen water called?", ["Steam", "Ice", "A very long answer about fog"], 1)
    context, options = encode_question(tokenizer, question, seq2seq=kind == "t5")
    batched = option_logprobs(model, context, options)
    for option, got in zip(options, batched):
        with torch.no_grad():
            if kind == "t5":
                logits = model(input_ids=torch.tensor([context]), labels=torch.tensor([option])).logits[0]
            else:
                logits = model(input_ids=torch.tensor([context + option])).logits[0, len(context) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(option)[:, None]).sum()
        assert got == pytest.approx(float(expected), abs=1e-4)


def test_mc_accuracy_picks_the_most_likely_option(model_dirs, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    questions = read_mc_file(MC_FILE)[:6]
    expected = []
    for q in questions:
        scores = option_logprobs(model, *encode_question(tokenizer, q, False))
        expected.append(float(scores.index(max(scores)) == q.answer))
    result = mc_accuracy(model, tokenizer, questions)
    assert result["n"] == 6 and result["accuracy"]["value"] == pytest.approx(sum(expected) / 6)
    assert result["accuracy"]["ci_low"] <= result["accuracy"]["value"] <= result["accuracy"]["ci_high"]


def test_read_mc_file_layouts(tmp_path):
    csv_file = tmp_path / "mc.csv"
    csv_file.write_text("question,A,B,C,D,answer\nWhat is 2+2?,3,4,5,6,B\n")
    assert read_mc_file(csv_file) == [McQuestion("What is 2+2?", ["3", "4", "5", "6"], 1)]
    questions = read_mc_file(MC_FILE)
    assert len(questions) == 40 and all(0 <= q.answer < len(q.choices) for q in questions)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(DataError, match="outside the 2 choices"):
        read_mc_file(bad)
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(DataError, match="row 1: needs columns"):
        read_mc_file(bad)


def test_chatterbot_task_is_seeded_and_has_references():
    first, again = chatterbot_task(limit=20), chatterbot_task(limit=20)
    assert first.rows == again.rows and len(first.rows) == 20
    assert all(row["question"] and row["answer"] for row in first.rows)
    assert len({row["question"] for row in first.rows}) == 20


def test_forgetting_table_reports_change_against_base():
    def task(primary: bool, base: float, tuned: float) -> dict:
        return {"primary": primary, "scores": {"base": {"rougeL": {"value": base}}, "lora": {"rougeL": {"value": tuned}}}}

    results = {"tasks": {"mine": task(True, 0.2, 0.4), "other": task(False, 0.2, 0.15)},
               "multiple_choice": {"scores": {"base": {"accuracy": {"value": 0.5}}, "lora": {"accuracy": {"value": 0.5}}}}}
    table = forgetting_table(results)
    assert set(table) == {"other", "multiple_choice"}, "the trained task is not a forgetting task"
    assert table["other"]["lora"]["change"] == pytest.approx(-0.05)
    assert table["other"]["lora"]["change_pct"] == pytest.approx(-25.0)
    assert mean_change(table) == {"lora": pytest.approx(-12.5)}


def test_markdown_table_escapes_cells():
    text = markdown_table((["a", "b"], [["x|y", "line\nbreak"]]))
    assert text.splitlines()[2] == "| x\\|y | line<br>break |"


def test_sweep_grid_scales_alpha_and_skips_rank_for_full(tmp_path, model_dirs, data_file):
    cfg = config_from_dict(tiny_run_config(model_dirs["llama"], data_file, tmp_path / "unused"))
    configs = grid(cfg, ["lora", "full"], [2, 8], [1e-3, 1e-2], tmp_path)
    assert [(c.method, c.lora.r if c.method == "lora" else None, c.train.lr) for c in configs] == [
        ("lora", 2, 1e-3), ("lora", 8, 1e-3), ("lora", 2, 1e-2), ("lora", 8, 1e-2), ("full", None, 1e-3), ("full", None, 1e-2)]
    assert [c.lora.alpha / c.lora.r for c in configs[:4]] == [2.0] * 4
    assert len({c.output_dir for c in configs}) == 6
    with pytest.raises(PeftkitError):
        grid(cfg, ["lora"], [], [1e-3], tmp_path)


def test_sweep_trains_scores_and_plots(tmp_path, model_dirs, data_file):
    raw = tiny_run_config(model_dirs["llama"], data_file, tmp_path / "unused")
    raw["generate"] = {"max_new_tokens": 4, "num_samples": 0}
    results = run_sweep(config_from_dict(raw), ["lora"], [1, 4], [1e-2], tmp_path / "sweep", limit=2)
    points = results["sweep"]["points"]
    assert [p["rank"] for p in points] == [1, 4] and results["sweep"]["split"] == "validation"
    assert points[1]["trainable_params"] == 4 * points[0]["trainable_params"]
    assert all(0.0 <= p["score"] <= 1.0 and p["train_seconds"] is not None for p in points)
    out = write_report(results, tmp_path / "sweep" / "report", title="sweep")
    assert (out / "sweep-rank.png").is_file() and (out / "sweep-params.png").is_file()
    assert "| lora-r4-lr0.01 | lora | 4 |" in (out / "report.md").read_text()
    again = run_sweep(config_from_dict(raw), ["lora"], [1], [1e-2], tmp_path / "sweep", limit=2)
    assert again["sweep"]["points"][0]["score"] == points[0]["score"], "a finished run is reused, not retrained"


def test_run_evaluation_without_base_has_no_change_column(runs):
    systems = describe_systems([runs["lora"]], include_base=False)
    task = task_from_run(systems[0].meta, limit=2)
    results = run_evaluation(systems, [task], SETTINGS, device="cpu")
    assert results["tasks"][task.name]["change_vs_base_pct"] == {} and results["forgetting"] == {}


def test_recorded_system_is_rescored_on_the_same_rows(runs, tmp_path):
    from peftkit.eval.recorded import read_recorded

    systems = describe_systems([runs["full"]], include_base=True)
    task = task_from_run(systems[1].meta, limit=3)
    earlier = run_evaluation(systems, [task], SETTINGS, device="cpu")
    write_report(earlier, tmp_path / "earlier")
    recorded = read_recorded(f"full={tmp_path / 'earlier' / 'results.json'}")
    assert (recorded.name, recorded.kind, recorded.trainable_pct) == ("full (recorded)", "recorded", 100.0)
    fewer = task_from_run(systems[1].meta, limit=2)
    now = run_evaluation([systems[0], recorded], [fewer], SETTINGS, device="cpu")
    live = run_evaluation(systems, [fewer], SETTINGS, device="cpu")["tasks"][task.name]
    scored = now["tasks"][task.name]
    assert scored["outputs"]["full (recorded)"] == live["outputs"]["full"] == earlier["tasks"][task.name]["outputs"]["full"][:2]
    assert scored["scores"]["full (recorded)"] == live["scores"]["full"]
    assert scored["change_vs_base_pct"]["full (recorded)"] == live["change_vs_base_pct"]["full"]
    with pytest.raises(PeftkitError, match="other rows"):
        run_evaluation([recorded], [task_from_run(systems[1].meta, split="validation", limit=2)], SETTINGS, device="cpu")
    with pytest.raises(PeftkitError, match="max_new_tokens 5"):
        run_evaluation([recorded], [fewer], GenerationSettings(max_new_tokens=6, batch_size=2), device="cpu")
    with pytest.raises(PeftkitError, match="has no system 'lora'.*base, full"):
        read_recorded(f"lora={tmp_path / 'earlier' / 'results.json'}")
