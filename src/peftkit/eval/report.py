"""One folder per evaluation: results.json for machines, report.md and report.html for people.

Tables are built once as (header, rows) and rendered twice, to Markdown and to HTML; the
HTML embeds its figures as base64 PNGs so the single file can be mailed or archived.

Example:
    >>> write_report(results, "reports/lora-vs-full", title="aclsum outcome")
    PosixPath('reports/lora-vs-full')
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_bytes, atomic_write_text
from . import plots
from .forgetting import mean_change

Table = tuple[list[str], list[list[str]]]
PROMPT_CHARS = 280


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def clip(text: str, limit: int = PROMPT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def score_table(results: dict[str, Any], task: str) -> Table:
    """Absolute scores, the ROUGE-L interval, and the change against the base, one row per system."""
    data = results["tasks"][task]
    systems = {s["name"]: s for s in results["systems"]}
    header = ["system", "trainable %", "training time", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-L 95% CI",
              "ROUGE-Lsum", "BLEU", "exact match", "Δ ROUGE-1", "Δ ROUGE-2", "Δ ROUGE-L"]
    rows = []
    for name, m in data["scores"].items():
        change = data["change_vs_base_pct"].get(name, {})
        trainable = systems[name]["trainable_pct"]
        rows.append([
            name, "n/a" if trainable is None else f"{trainable:.4g}", seconds(systems[name]["train_seconds"]),
            num(m["rouge1"]["value"]), num(m["rouge2"]["value"]), num(m["rougeL"]["value"]),
            f"{num(m['rougeL']['ci_low'])}–{num(m['rougeL']['ci_high'])}", num(m["rougeLsum"]["value"]),
            num(m["bleu"]["value"], 2), num(m["exact_match"]["value"], 2),
            *(pct(change.get(k)) if name != "base" else "—" for k in ("rouge1", "rouge2", "rougeL")),
        ])
    return header, rows


def sample_rows(results: dict[str, Any], task: str) -> Table:
    """Prompt, reference and each system's output, side by side."""
    samples = results["tasks"][task]["samples"]
    systems = list(samples[0]["outputs"]) if samples else []
    header = ["#", "prompt", "reference", *systems]
    rows = [[str(i + 1), clip(s["prompt"]), s["reference"], *(s["outputs"][name] for name in systems)]
            for i, s in enumerate(samples)]
    return header, rows


def mc_table(results: dict[str, Any]) -> Table:
    mc = results["multiple_choice"]
    header = ["system", "accuracy", "95% CI", "accuracy (per-byte normalised)", "questions"]
    rows = [[name, num(m["accuracy"]["value"]), f"{num(m['accuracy']['ci_low'])}–{num(m['accuracy']['ci_high'])}",
             num(m["accuracy_norm"]["value"]), str(m["n"])] for name, m in mc["scores"].items()]
    return header, rows


def forgetting_rows(results: dict[str, Any]) -> Table:
    table = results["forgetting"]
    systems = sorted({s for rows in table.values() for s in rows})
    header = ["held-out task", "metric", "base", *(f"{s} (change)" for s in systems)]
    rows = []
    for task, per_system in table.items():
        first = next(iter(per_system.values()))
        cells = [f"{num(per_system[s]['after'])} ({pct(per_system[s]['change_pct'])})" if s in per_system else "n/a"
                 for s in systems]
        rows.append([task, first["metric"], num(first["before"]), *cells])
    means = mean_change(table)
    rows.append(["mean change", "", "", *(pct(means.get(s)) for s in systems)])
    return header, rows


def sweep_table(results: dict[str, Any]) -> Table:
    sweep = results["sweep"]
    header = ["run", "method", "rank", "lr", "trainable params", f"{sweep['metric']} ({sweep['split']})", "training time"]
    rows = [[p["name"], p["method"], "—" if p["rank"] is None else str(p["rank"]), f"{p['lr']:g}",
             f"{p['trainable_params']:,d}", num(p["score"]), seconds(p["train_seconds"])] for p in sweep["points"]]
    return header, rows


def markdown_table(table: Table) -> str:
    header, rows = table

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(table: Table, css_class: str = "scores") -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figures(results: dict[str, Any]) -> dict[str, bytes]:
    """{file name: PNG} for everything the results can show."""
    out: dict[str, bytes] = {}
    for task, data in results.get("tasks", {}).items():
        if data["primary"]:
            out[f"scores-{task.replace('/', '-')}.png"] = plots.score_bars(data["scores"])
    if results.get("loss_curves"):
        out["loss.png"] = plots.loss_curves(results["loss_curves"])
    if results.get("forgetting"):
        out["forgetting.png"] = plots.forgetting_bars(results["forgetting"])
    if results.get("sweep"):
        metric = results["sweep"]["metric"]
        out["sweep-rank.png"] = plots.sweep_curves(results["sweep"]["points"], "rank", metric)
        out["sweep-params.png"] = plots.sweep_curves(results["sweep"]["points"], "trainable_params", metric)
    return out


def settings_line(results: dict[str, Any]) -> str:
    s = results.get("settings", {})
    if not s:
        return ""
    decoding = "sampling" if s["do_sample"] else ("beam search" if s["num_beams"] > 1 else "greedy")
    return (f"Decoding: {decoding} (beams {s['num_beams']}), at most {s['max_new_tokens']} new tokens, stop at EOS; "
            f"scored on {'the first line' if s['first_line'] else 'the whole output'}; ROUGE from rouge-score "
            f"(F1, stemming {'on' if s['stemmer'] else 'off'}), BLEU from sacrebleu (0–100); "
            f"95% intervals: percentile bootstrap, 1000 resamples, seed {s['seed']}.")


def sections(results: dict[str, Any], image: Callable[[str], str], render: Callable[[Table], str]) -> list[tuple[str, list[str]]]:
    """(heading, blocks) in report order; `image(name)` and `render(table)` pick the output format."""
    out: list[tuple[str, list[str]]] = []
    pngs = results["_figures"]
    for task, data in results.get("tasks", {}).items():
        if not data["primary"]:
            continue
        name = f"scores-{task.replace('/', '-')}.png"
        blocks = [f"{data['n']} {data['split']} examples. " + settings_line(results), render(score_table(results, task))]
        out.append((f"Scores on {task}", blocks + ([image(name)] if name in pngs else [])))
    if "loss.png" in pngs:
        out.append(("Training loss", [image("loss.png")]))
    if results.get("forgetting"):
        out.append(("Forgetting: held-out tasks, before (base) and after",
                    [render(forgetting_rows(results)), image("forgetting.png")]))
    if "multiple_choice" in results:
        out.append((f"Multiple choice ({results['multiple_choice']['source']})", [render(mc_table(results))]))
    if results.get("sweep"):
        out.append(("Sweep", [render(sweep_table(results)), image("sweep-rank.png"), image("sweep-params.png")]))
    for task, data in results.get("tasks", {}).items():
        if data["samples"]:
            out.append((f"Side by side: {task}", [render(sample_rows(results, task))]))
    return out


def render_markdown(results: dict[str, Any], title: str) -> str:
    parts = [f"# {title}"]
    for heading, blocks in sections(results, lambda name: f"![{name}]({name})", markdown_table):
        parts.append(f"## {heading}\n\n" + "\n\n".join(blocks))
    return "\n\n".join(parts) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } table.scores td { white-space: nowrap; }
table.samples td { max-width: 320px; white-space: pre-wrap; }
img { max-width: 100%; display: block; margin: 0.5em 0; } p { line-height: 1.4; }
"""


def render_html(results: dict[str, Any], title: str) -> str:
    pngs = results["_figures"]

    def image(name: str) -> str:
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}">'

    def render(table: Table) -> str:
        return html_table(table, "samples" if table[0][:2] == ["#", "prompt"] else "scores")

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections(results, image, render):
        body = "".join(b if b.startswith("<") else f"<p>{html.escape(b)}</p>" for b in blocks)
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(results: dict[str, Any], out: str | Path, title: str = "peftkit evaluation") -> Path:
    """Write results.json, report.md (+ its PNGs) and a self-contained report.html into `out`."""
    out = Path(out)
    pngs = figures(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")  # keeps system order
    for name, data in pngs.items():
        atomic_write_bytes(out / name, data)
    view = {**results, "_figures": pngs}
    atomic_write_text(out / "report.md", render_markdown(view, title))
    atomic_write_text(out / "report.html", render_html(view, title))
    return out
