"""One short `peftkit train` per method on the default model and task: the table of docs/methods.md.

Each run is its own `peftkit train` process (so its peak memory is its own), one after another,
each under the shared heavy-job lock (/tmp/peftkit-heavy.lock, flock) and niced, with the same
seed and steps. Per run: trainable parameters, adapter size on disk, peak RSS of the whole process
(`ru_maxrss`, printed by `peftkit train`) and of the training steps alone (RSS sampled every 0.2 s
while metrics.jsonl grows), training tokens/s (the loop's figure, and its fastest step's: the least disturbed on a shared
machine), validation loss after the run,
and `peftkit estimate`'s prediction of the peak beside the measured one.

    nice -n 5 .venv/bin/python benchmarks/bench_methods.py --steps 10 --out runs/methods
    .venv/bin/python benchmarks/bench_methods.py --out runs/methods --table-only   # rows of finished runs
    .venv/bin/python benchmarks/bench_methods.py --only lora,full                  # some rows
    .venv/bin/python benchmarks/bench_methods.py --no-lock --nice 19               # beside a locked job, idle CPU only
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from peftkit.config import load_config
from peftkit.estimate import estimate_memory

RUNS = {  # row key -> (label, --set overrides)
    "lora": ("LoRA (r 16, q/v)", ["method=lora"]),
    "dora": ("DoRA (r 16, q/v)", ["method=lora", "lora.use_dora=true"]),
    "qlora": ("QLoRA (NF4 base, r 16, q/v)", ["method=qlora"]),
    "prompt_tuning": ("prompt tuning (20 virtual tokens)", ["method=prompt_tuning"]),
    "prefix_tuning": ("prefix tuning (20 virtual tokens)", ["method=prefix_tuning"]),
    "adaption_prompt": ("adaption prompt (len 10, top 8 layers)", ["method=adaption_prompt"]),
    "houlsby": ("bottleneck, Houlsby (reduction 16)", ["method=bottleneck", "bottleneck.placement=houlsby"]),
    "pfeiffer": ("bottleneck, Pfeiffer (reduction 16)", ["method=bottleneck", "bottleneck.placement=pfeiffer"]),
    "selective": ("selective (top 2 blocks)", ["method=selective"]),
    "norms": ("selective (norms only)", ["method=selective", "selective.top_layers=0", "selective.components=[norms]"]),
    "full": ("full fine-tuning (lr 2e-5)", ["method=full", "train.lr=2e-5"]),
}
LOCK = Path("/tmp/peftkit-heavy.lock")
GIB = 2**30


def overrides(key: str, steps: int, out: Path) -> list[str]:
    return [*RUNS[key][1], f"train.max_steps={steps}", "train.save_every=0", "generate.num_samples=0",
            f"output_dir={out / key}"]


def rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) * 1024 if found else 0


def train(key: str, steps: int, out: Path, lock_path: Path | None = LOCK, niceness: int = 5) -> None:
    """`peftkit train` for one row, under the heavy-job lock (unless `lock_path` is None); RSS samples
    go to <key>.rss.jsonl."""
    sets = overrides(key, steps, out)
    command = ["nice", "-n", str(niceness), sys.executable, "-m", "peftkit.cli", "train", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    metrics = out / key / "metrics.jsonl"
    with (lock_path or Path(os.devnull)).open("a") as lock, (out / f"{key}.log").open("w") as log, \
            (out / f"{key}.rss.jsonl").open("w") as samples:
        if lock_path:
            fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        while child.poll() is None:
            steps_logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            samples.write(json.dumps({"t": round(time.perf_counter() - started, 2), "rss": rss_bytes(child.pid),
                                      "lines": steps_logged}) + "\n")
            time.sleep(0.2)
    if child.returncode:
        print(f"{key}: peftkit train exited {child.returncode}; see {out / f'{key}.log'}", file=sys.stderr)


def measured(key: str, out: Path) -> dict:
    folder = out / key
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "loss" in r]
    trainable = json.loads((folder / "summary.json").read_text())["trainable"]
    samples = [json.loads(line) for line in (out / f"{key}.rss.jsonl").read_text().splitlines() if line]
    in_steps = [s["rss"] for s in samples if 1 <= s["lines"] < len(steps)]  # after step 1 logged, before the last
    return {
        "trainable": int(trainable.split("trainable params: ")[1].split(" ")[0].replace(",", "")),
        "share": trainable.rsplit("trainable%: ", 1)[1],
        "size": sum(f.stat().st_size for f in (folder / "adapter").glob("*.safetensors")),
        "peak": float(re.search(r"peak RSS\s*│\s*([\d.]+) GB", (out / f"{key}.log").read_text()).group(1)) * GIB,  # ru_maxrss KiB / 1024**2
        "step_peak": max(in_steps, default=0),
        "tokens_per_s": steps[-1]["tokens_per_s"],
        "fastest_step": max(step_rates(steps), default=0.0),
        "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
    }


def step_rates(steps: list[dict]) -> list[float]:
    """Each step's own tokens/s, from the loop's running figure (tokens so far / seconds so far)."""
    rates, tokens, seconds = [], 0.0, 0.0
    for record in steps:
        now_tokens, now_seconds = record["tokens_per_s"] * record["elapsed_s"], record["elapsed_s"]
        if now_seconds > seconds:
            rates.append((now_tokens - tokens) / (now_seconds - seconds))
        tokens, seconds = now_tokens, now_seconds
    return rates


def estimated(key: str, out: Path) -> float:
    """`peftkit estimate` for the config the run saved (the same batches)."""
    return estimate_memory(load_config(out / key / "config.yaml")).total


def row(key: str, m: dict, estimate: float) -> str:
    size = f"{m['size'] / 2**20:,.1f} MiB" if m["size"] >= 2**20 else f"{m['size'] / 1024:,.0f} KiB"
    error = (estimate - m["peak"]) / m["peak"]
    return (f"| {RUNS[key][0]} | {m['trainable']:,d} ({m['share']}%) | {size} | {m['peak'] / GIB:.2f} | "
            f"{m['step_peak'] / GIB:.2f} | {estimate / GIB:.2f} ({error:+.0%}) | {m['tokens_per_s']:.0f} ({m['fastest_step']:.0f}) | {m['val_loss']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated rows of {', '.join(RUNS)}")
    parser.add_argument("--no-lock", action="store_true", help=f"do not wait for {LOCK} (another job holds it)")
    parser.add_argument("--nice", type=int, default=5, help="niceness of each training process (default 5)")
    parser.add_argument("--table-only", action="store_true", help="only print rows for runs already finished")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| method | trainable params | adapter on disk | peak RSS, GiB | peak in steps, GiB | estimate, GiB "
          "(error) | tokens/s (fastest step) | val loss |\n|---|---|---|---|---|---|---|---|", flush=True)
    for key in args.only.split(","):
        if not args.table_only:
            train(key, args.steps, args.out, None if args.no_lock else LOCK, args.nice)
        if (args.out / key / "summary.json").is_file():
            print(row(key, measured(key, args.out), estimated(key, args.out)), flush=True)


if __name__ == "__main__":
    main()
