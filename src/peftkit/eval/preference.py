"""`peftkit eval --pairs FILE`: how often each system prefers the chosen answer of a preference pair.

Each answer is scored by the summed log-probability of its tokens after the system's own prompt format
(the one its training recorded in peftkit.json, when the pair file has the columns it reads; else the
plain `prompt` column), through the same scoring as `objective: dpo` (train/preference.py).

Per system:
- `likelihood_accuracy`: share of pairs whose chosen answer is more likely than the rejected one;
- with the base model among the systems, for every other system, DPO's implicit reward against that
  reference: `accuracy` (the chosen answer's log-likelihood ratio to the base beats the rejected one's)
  and `margin`, the mean of (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), in nats (times beta: DPO's
  reward margin).

Example:
    >>> rows = read_pair_file("pairs.jsonl")
    >>> scores = preference_scores(systems, rows, device="cpu")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..data.preference import PairStats, PairTask, check_pair_rows, tokenize_pairs
from ..data.sources import read_rows
from ..data.templates import PromptFormat, template_fields
from ..errors import DataError
from ..train.preference import answer_tokens, pair_batch, sequence_logps
from .report import Table
from .systems import System, SystemPool

BATCH_PAIRS = 8


def read_pair_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows of prompt / chosen / rejected text (any format `read_rows` reads), checked."""
    rows = read_rows(path)
    task = PairTask(rows, [], [], PromptFormat.resolve(None, "prompt", True, None))
    check_pair_rows(rows, ["prompt", "chosen", "rejected"], task, str(path))
    return rows


def system_pair_task(system: System, rows: Sequence[Mapping[str, Any]]) -> PairTask:
    """The pairs under the system's training prompt format when the rows have its columns, else `{prompt}`."""
    recorded = system.meta.get("prompt_format")
    fmt = PromptFormat.from_dict(recorded) if recorded else None
    if fmt is None or not all(f in rows[0] for t in fmt.templates for f in template_fields(t)):
        fmt = PromptFormat.resolve(None, "prompt", True, None)
    return PairTask(list(rows), [], [], fmt, "text", name=system.name)


def pair_logps(model: torch.nn.Module, pairs: Sequence[Mapping[str, Any]], pad_id: int) -> torch.Tensor:
    """(pairs, 2): summed log-probability of each pair's chosen and rejected answer."""
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(pairs), BATCH_PAIRS):
            piece = pairs[start : start + BATCH_PAIRS]
            batch = {k: v.to(device) for k, v in pair_batch(piece, pad_id, flat=False).items()}
            tokens = torch.tensor([answer_tokens(p[side]) for side in ("chosen", "rejected") for p in piece])
            sums = sequence_logps(model, batch, tokens).float().cpu()
            out.append(torch.stack([sums[: len(piece)], sums[len(piece) :]], dim=1))
    return torch.cat(out)


def preference_scores(systems: list[System], rows: Sequence[Mapping[str, Any]], device: str = "auto",
                      precision: str = "fp32", max_length: int = 1024) -> dict[str, Any]:
    """{"n", "left_out", "scores": {system: {likelihood_accuracy[, accuracy, margin]}}} (see the module docstring)."""
    live = [s for s in systems if s.kind != "recorded"]
    pool = SystemPool(live, device, precision)
    logps: dict[str, torch.Tensor] = {}
    stats = PairStats()
    for system in live:
        with pool.use(system) as loaded:
            pairs, stats = tokenize_pairs(rows, loaded.tokenizer, system_pair_task(system, rows), max_length, "pairs")
            if not pairs:
                raise DataError(f"--pairs: no usable pair (identical answers: {stats.identical}, empty: {stats.empty})")
            logps[system.name] = pair_logps(loaded.model, pairs, loaded.tokenizer.pad_token_id)
    base = next((s.name for s in live if s.kind == "base"), None)
    scores: dict[str, dict[str, float]] = {}
    for name, values in logps.items():
        scores[name] = {"likelihood_accuracy": float((values[:, 0] > values[:, 1]).float().mean())}
        if base is not None and name != base and values.shape == logps[base].shape:
            ratios = values - logps[base]
            margin = ratios[:, 0] - ratios[:, 1]
            scores[name].update({"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())})
    return {"n": stats.pairs, "left_out": {"identical": stats.identical, "empty": stats.empty}, "reference": base,
            "scores": scores}


def preference_table(preference: dict[str, Any]) -> Table:
    """One row per system: likelihood accuracy, and accuracy / margin against the base."""
    header = ["system", "chosen more likely", f"accuracy vs {preference['reference'] or 'base'}", "margin (nats)"]
    rows = []
    for name, score in preference["scores"].items():
        accuracy, margin = score.get("accuracy"), score.get("margin")
        rows.append([name, f"{score['likelihood_accuracy']:.3f}", "-" if accuracy is None else f"{accuracy:.3f}",
                     "-" if margin is None else f"{margin:+.3f}"])
    return header, rows
