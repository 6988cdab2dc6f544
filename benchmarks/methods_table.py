"""Measure every method on the default model and task, one short run each, one at a time.

Each run is its own process (peak RSS is per process), niced, same seed and steps. Prints the
markdown table of docs/methods.md: method, trainable parameters, adapter size on disk, peak
training memory (RSS), training tokens/s, validation loss; and the estimator's prediction of the
peak beside the measured one.

    nice -n 10 .venv/bin/python benchmarks/methods_table.py --steps 10 --out /tmp/methods
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RUNS = {
    "lora": ["method=lora"],
    "dora": ["method=lora", "lora.use_dora=true"],
    "qlora (4-bit NF4)": ["method=qlora"],
    "selective (top 2 blocks)": ["method=selective"],
    "selective (norms only)": ["method=selective", "selective.top_layers=0", "selective.components=[norms]"],
    "full": ["method=full", "train.lr=2e-5"],
}

CHILD = """
import json, sys
from peftkit.config import load_config
from peftkit.estimate import estimate_memory
from peftkit.train import run_training
cfg = load_config(None, sys.argv[1:])
predicted = estimate_memory(cfg).total / 2**30
r = run_training(cfg)
size = sum(f.stat().st_size for f in r.adapter_dir.iterdir() if f.is_file())
print("RESULT " + json.dumps({"trainable": r.trainable, "size": size, "peak": r.peak_rss_gb, "tps": r.tokens_per_s,
                              "val": r.val_loss, "predicted": predicted}))
"""


def measure(overrides: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *overrides], capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="/tmp/peftkit-methods")
    args = parser.parse_args()
    print("| method | trainable params | adapter on disk | peak RSS (estimated) | tokens/s | val loss |")
    print("|---|---|---|---|---|---|")
    for name, overrides in RUNS.items():
        folder = Path(args.out) / name.split()[0]
        common = [f"train.max_steps={args.steps}", "generate.num_samples=0", f"output_dir={folder}", "train.save_every=0"]
        r = measure([*overrides, *common])
        trainable = r["trainable"].split("||")[0].removeprefix("trainable params:").strip()
        print(f"| {name} | {trainable} | {r['size'] / 2**20:.1f} MiB | {r['peak']:.2f} GB ({r['predicted']:.2f}) "
              f"| {r['tps']:.0f} | {r['val']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
