"""Answers the UI needs from model-side code, computed in a child process: `python -m peftkit.ui.worker WHAT`.

The UI's own process never imports torch, transformers or the training code; it runs this
module with a JSON config dict on stdin and reads one JSON object from stdout:

    catalog    the built-in models and datasets (no input)
    estimate   `peftkit estimate` of the config: memory rows in bytes, trainable parameters
    examples   the first test examples of the config's data: the text a prompt fills, the reference

A user's mistake comes back as {"error": message}; a bug exits 1 with its traceback on stderr.

Example:
    $ echo '{"method": "lora"}' | python -m peftkit.ui.worker estimate
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from ..config import ENCODER_DATASETS, config_from_dict
from ..data.datasets import load_tasks
from ..data.sources import BUILTIN_DATASETS
from ..data.templates import template_fields
from ..errors import PeftkitError
from ..estimate import estimate_memory
from ..models import BUILTIN_MODELS

MAX_EXAMPLES = 20


def catalog(_: dict[str, Any]) -> dict[str, Any]:
    datasets = sorted(set(BUILTIN_DATASETS) | {d for names in ENCODER_DATASETS.values() for d in names})
    return {"models": sorted(BUILTIN_MODELS), "datasets": datasets}


def estimate(raw: dict[str, Any]) -> dict[str, Any]:
    est = estimate_memory(config_from_dict(raw, source="form"))
    return {"method": est.method, "rows": [[label, int(value)] for label, value in est.rows()], "total": int(est.total),
            "trainable_params": est.trainable_params, "total_params": est.total_params,
            "batch": [est.batch.rows, est.batch.length], "state_vs_weights": est.state_vs_weights}


def examples(raw: dict[str, Any]) -> dict[str, Any]:
    """Test rows of the first task, as (the value a one-field prompt template reads, the reference)."""
    cfg = config_from_dict(raw, source="config.yaml")
    task = load_tasks(cfg.data, cfg.train.seed)[0]
    fields = template_fields(task.format.templates[0])
    if len(set(fields)) != 1:
        return {"examples": [], "note": f"the template reads {sorted(set(fields))}; type a prompt instead"}
    rows = (task.test or task.validation)[:MAX_EXAMPLES]
    return {"examples": [{"input": str(r.get(fields[0], "")), "reference": str(r.get(task.response, ""))} for r in rows]}


COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"catalog": catalog, "estimate": estimate, "examples": examples}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(f"usage: python -m peftkit.ui.worker {{{','.join(COMMANDS)}}} < config.json", file=sys.stderr)
        return 2
    text = sys.stdin.read() if argv[0] != "catalog" else "{}"
    try:
        answer = COMMANDS[argv[0]](json.loads(text or "{}"))
    except PeftkitError as exc:
        answer = {"error": str(exc)}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
