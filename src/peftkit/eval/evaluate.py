"""Score several systems on several tasks in one pass: generate, keep the first line, compare with the base.

Each system is activated once and runs every task (and the multiple-choice file) before the
next one loads. Scores are rouge-score / sacrebleu numbers with seeded bootstrap intervals;
`change_vs_base_pct` is the relative change of each corpus score against the base column.

Example:
    >>> systems = describe_systems(["runs/lora/adapter"], include_base=True)
    >>> task = task_from_run(systems[1].meta, limit=50)
    >>> results = run_evaluation(systems, [task], GenerationSettings())
    >>> results["tasks"][task.name]["scores"]["lora"]["rougeL"]["value"]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..data.templates import PromptFormat
from ..generate import Decoding, answer_rows
from ..artifacts import saved_format
from .forgetting import forgetting_table
from .metrics import first_line, text_metrics
from .multiple_choice import McQuestion, mc_accuracy
from .recorded import check_decoding, recorded_outputs
from .systems import LoadedSystem, System, SystemPool
from .tasks import EvalTask, trained_task_name

log = logging.getLogger(__name__)

COMPARED_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "exact_match")


@dataclass
class GenerationSettings(Decoding):
    """Decoding (as everywhere answers are generated) and scoring choices, recorded in results.json."""

    first_line: bool = True
    """Score only the first non-blank line of each output (summaries are one sentence)."""
    stemmer: bool = True
    """Porter stemming in ROUGE (rouge-score's use_stemmer)."""

    def decoding(self) -> Decoding:
        """The generation part alone."""
        return Decoding(**{f.name: getattr(self, f.name) for f in fields(Decoding)})


def system_format(system: System, task: EvalTask) -> PromptFormat:
    """A system's own training task is prompted as the system recorded it; other tasks with their canonical format."""
    if system.meta.get("prompt_format") and trained_task_name(system.meta) == task.name:
        return saved_format(system.meta)
    return task.format


def generate_outputs(
    loaded: LoadedSystem, fmt: PromptFormat, rows: Sequence[dict[str, Any]], settings: GenerationSettings,
    advance: Any = None,
) -> list[str]:
    """Outputs in row order, decoded as everywhere else (`generate.answer_rows`)."""
    return answer_rows(loaded.model, loaded.tokenizer, fmt, rows, settings.decoding(), advance)


def score_outputs(outputs: Sequence[str], references: Sequence[str], settings: GenerationSettings) -> dict[str, Any]:
    predictions = [first_line(o) for o in outputs] if settings.first_line else list(outputs)
    return text_metrics(predictions, references, stemmer=settings.stemmer, seed=settings.seed)


def change_vs_base(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Relative change in percent of each system's corpus scores against the `base` column."""
    if "base" not in scores:
        return {}
    base = scores["base"]
    change: dict[str, dict[str, float | None]] = {}
    for system, metrics in scores.items():
        change[system] = {
            name: (100.0 * (metrics[name]["value"] - base[name]["value"]) / base[name]["value"])
            if base[name]["value"] else None
            for name in COMPARED_METRICS
        }
    return change


def sample_table(task: EvalTask, outputs: dict[str, list[str]], count: int) -> list[dict[str, Any]]:
    """The first `count` rows: prompt, reference, and every system's output, for a person to read."""
    return [
        {"prompt": task.format.render(row), "reference": str(row[task.response]),
         "outputs": {system: texts[i] for system, texts in outputs.items()}}
        for i, row in enumerate(task.rows[:count])
    ]


def run_system(
    loaded: LoadedSystem, system: System, tasks: list[EvalTask], settings: GenerationSettings, progress: Any = None,
) -> dict[str, list[str]]:
    """One system's outputs on every task: {task name: outputs in row order}."""
    outputs = {}
    for task in tasks:
        bar = progress.add_task(f"{system.name}: {task.name}", total=len(task.rows)) if progress else None
        advance = (lambda n, bar=bar: progress.advance(bar, n)) if progress else None
        outputs[task.name] = generate_outputs(loaded, system_format(system, task), task.rows, settings, advance)
    return outputs


def run_evaluation(
    systems: list[System], tasks: list[EvalTask], settings: GenerationSettings,
    mc_questions: list[McQuestion] | None = None, mc_source: str | None = None,
    device: str = "auto", precision: str = "fp32", progress: Any = None, samples: int = 10,
) -> dict[str, Any]:
    """Every system on every task (and the multiple-choice questions); the dict results.json holds."""
    live = [s for s in systems if s.kind != "recorded"]
    recorded = [s for s in systems if s.kind == "recorded"]
    for system in recorded:
        check_decoding(system, asdict(settings))
    pool = SystemPool(live, device, precision)
    outputs: dict[str, dict[str, list[str]]] = {task.name: {} for task in tasks}
    mc_scores: dict[str, Any] = {}
    for system in live:
        with pool.use(system) as loaded:
            for task_name, texts in run_system(loaded, system, tasks, settings, progress).items():
                outputs[task_name][system.name] = texts
            if mc_questions:
                mc_scores[system.name] = mc_accuracy(loaded.model, loaded.tokenizer, mc_questions, seed=settings.seed)
    for system in recorded:  # outputs an earlier evaluation generated, scored again here
        for task in tasks:
            texts = recorded_outputs(system, task.name, task.split, task.references())
            if texts is not None:
                outputs[task.name][system.name] = texts
    results: dict[str, Any] = {
        "settings": asdict(settings),
        "systems": [s.summary() for s in systems],
        "loss_curves": {s.name: s.loss_curve for s in systems if s.loss_curve},
        "tasks": {task.name: task_results(task, outputs[task.name], settings, samples) for task in tasks},
    }
    if mc_questions:
        results["multiple_choice"] = {"source": mc_source, "n": len(mc_questions), "scores": mc_scores}
    results["forgetting"] = forgetting_table(results)
    return results


def task_results(task: EvalTask, outputs: dict[str, list[str]], settings: GenerationSettings, samples: int) -> dict[str, Any]:
    """Scores per system, change against the base, the side-by-side sample and every output."""
    scores = {system: score_outputs(texts, task.references(), settings) for system, texts in outputs.items()}
    for system, metrics in scores.items():
        log.info("%s on %s: ROUGE-L %.3f", system, task.name, metrics["rougeL"]["value"])
    return {
        "split": task.split, "n": len(task.rows), "primary": task.primary,
        "scores": scores, "change_vs_base_pct": change_vs_base(scores),
        "samples": sample_table(task, outputs, samples), "outputs": outputs, "references": task.references(),
    }
