"""The report's figures as PNG bytes (matplotlib, no display): loss curves, score bars, forgetting, sweeps.

Example:
    >>> png = score_bars({"base": scores_base, "lora": scores_lora})
    >>> Path("bars.png").write_bytes(png)
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
                 "bleu": "BLEU", "exact_match": "exact match"}


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def loss_curves(curves: dict[str, Sequence[Sequence[float]]]) -> bytes:
    """Training loss against step, one line per system that has a training log."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=name, linewidth=1.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def score_bars(scores: dict[str, dict[str, Any]], metrics: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> bytes:
    """Grouped bars: one group per metric, one bar per system, 95% bootstrap intervals as error bars."""
    systems = list(scores)
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, system in enumerate(systems):
        values = [scores[system][m]["value"] for m in metrics]
        errors = [[v - scores[system][m]["ci_low"] for v, m in zip(values, metrics)],
                  [scores[system][m]["ci_high"] - v for v, m in zip(values, metrics)]]
        positions = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(metrics))]
        bars = ax.bar(positions, values, width, yerr=errors, capsize=3, label=system)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(metrics)), [METRIC_LABELS.get(m, m) for m in metrics])
    ax.set_ylabel("F1 (rouge-score, stemmed)")
    ax.set_title("Scores per system (95% bootstrap intervals)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _png(fig)


def forgetting_bars(table: dict[str, dict[str, dict[str, Any]]]) -> bytes:
    """Change against the base on each held-out task (negative = forgotten), one bar per tuned system."""
    tasks = list(table)
    systems = sorted({s for rows in table.values() for s in rows})
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, system in enumerate(systems):
        values = [table[t].get(system, {}).get("change_pct") or 0.0 for t in tasks]
        positions = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(tasks))]
        bars = ax.bar(positions, values, width, label=system)
        ax.bar_label(bars, fmt="%+.1f%%", fontsize=7, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_ylabel("change vs base (%)")
    ax.set_title("Held-out tasks: change against the base model")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _png(fig)


def sweep_curves(points: list[dict[str, Any]], x: str, metric: str, log_x: bool = True) -> bytes:
    """Score against `x` (rank or trainable parameters), one line per (method, learning rate)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    series: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        label = f"{p['method']} lr={p['lr']:g}"
        if p.get(x) is None:  # full fine-tuning has no rank: a reference line
            ax.axhline(p["score"], linestyle="--", color="gray", label=label)
        else:
            series.setdefault(label, []).append((p[x], p["score"]))
    for label, xy in series.items():
        xy.sort()
        ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2 if x == "rank" else 10)
    if x == "rank":
        ranks = sorted({a for xy in series.values() for a, _ in xy})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
    ax.set_xlabel({"rank": "LoRA rank r", "trainable_params": "trainable parameters"}.get(x, x))
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{METRIC_LABELS.get(metric, metric)} against {'rank' if x == 'rank' else 'trainable parameters'}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)
