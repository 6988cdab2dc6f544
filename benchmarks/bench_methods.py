"""One short `peftkit train` per method on the default model and task, and the docs/methods.md rows.

Each run is its own `peftkit train` process (so its peak RSS is its own), one after another, with
the same seed and steps. Rows: trainable parameters, adapter size on disk, peak training RSS,
training tokens/s (the loop's figure) and validation loss after the run.

    nice -n 10 python benchmarks/bench_methods.py --steps 10 --out runs/methods
    python benchmarks/bench_methods.py --out runs/methods --table-only      # rows from finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

RUNS = {  # row label -> --set overrides
    "prompt tuning (20 virtual tokens, text init)": ["method=prompt_tuning"],
    "prefix tuning (20 virtual tokens, text init)": ["method=prefix_tuning"],
    "adaption prompt (len 10, top 8 layers)": ["method=adaption_prompt"],
    "bottleneck, Houlsby (reduction 16, relu)": ["method=bottleneck", "bottleneck.placement=houlsby"],
    "bottleneck, Pfeiffer (reduction 16, relu)": ["method=bottleneck", "bottleneck.placement=pfeiffer"],
}


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]


def train(label: str, overrides: list[str], steps: int, out: Path) -> None:
    folder = out / slug(label)
    sets = [*overrides, f"train.max_steps={steps}", "generate.num_samples=0", f"output_dir={folder}"]
    command = [sys.executable, "-m", "peftkit.cli", "train", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    with (out / f"{slug(label)}.log").open("w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)


def row(label: str, out: Path) -> str:
    folder = out / slug(label)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    trainable = json.loads((folder / "summary.json").read_text())["trainable"]
    count = int(trainable.split("trainable params: ")[1].split(" ")[0].replace(",", ""))
    share = trainable.rsplit("trainable%: ", 1)[1]
    size = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
    rss = re.search(r"peak RSS\s*│\s*([\d.]+) GB", (out / f"{slug(label)}.log").read_text()).group(1)
    return (f"| {label} | {count:,d} ({share}%) | {size / 1024:,.0f} KiB | {rss} GB | "
            f"{steps[-1]['tokens_per_s']:.0f} | {val:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--table-only", action="store_true", help="Only print rows for runs already finished.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for label, overrides in RUNS.items():
        if not args.table_only:
            train(label, overrides, args.steps, args.out)
        if (args.out / slug(label) / "summary.json").is_file():
            print(row(label, args.out), flush=True)


if __name__ == "__main__":
    main()
