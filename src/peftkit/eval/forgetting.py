"""Catastrophic forgetting: how much each system lost, against the base, on tasks it did not train on.

"Before" is the base model, "after" the tuned system, both on the same held-out rows. The
score per task is ROUGE-L F1 for generation tasks and log-likelihood accuracy for a
multiple-choice file; `change` is after - before, so forgetting shows as a negative number.

Example:
    >>> forgetting_table(results)["aclsum/challenge"]["lora"]["change"]
    -0.021
"""

from __future__ import annotations

from typing import Any

MC_TASK = "multiple_choice"


def held_out_scores(results: dict[str, Any]) -> dict[str, tuple[str, dict[str, float]]]:
    """{task: (metric name, {system: score})} for every task no system trained on."""
    out: dict[str, tuple[str, dict[str, float]]] = {}
    for name, task in results.get("tasks", {}).items():
        if not task["primary"]:
            out[name] = ("rougeL", {s: m["rougeL"]["value"] for s, m in task["scores"].items()})
    if "multiple_choice" in results:
        out[MC_TASK] = ("accuracy", {s: m["accuracy"]["value"] for s, m in results["multiple_choice"]["scores"].items()})
    return out


def forgetting_table(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {system: {metric, before, after, change, change_pct}}} for every tuned system; {} without a base."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for task, (metric, scores) in held_out_scores(results).items():
        if "base" not in scores:
            continue
        before = scores["base"]
        table[task] = {
            system: {
                "metric": metric, "before": before, "after": after, "change": after - before,
                "change_pct": 100.0 * (after - before) / before if before else None,
            }
            for system, after in scores.items() if system != "base"
        }
    return table


def mean_change(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Each system's average relative change (percent) over the held-out tasks: one number per system."""
    per_system: dict[str, list[float]] = {}
    for rows in table.values():
        for system, row in rows.items():
            if row["change_pct"] is not None:
                per_system.setdefault(system, []).append(row["change_pct"])
    return {system: sum(v) / len(v) for system, v in per_system.items()}
