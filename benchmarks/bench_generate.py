"""Greedy generation speed: the base model vs peftkit LoRA (merged, unmerged, mixed) vs HF PEFT.

One invocation measures two workloads on the CPU, in each dtype of `--dtypes` (default fp32) and
each batch size of `--batch`: the synthetic Llama of bench_train.py (hidden 512, 8 layers, vocab
32,000, seed 0) and the default model SmolLM2-135M. The base is cast to the dtype after the
adapters are made, so both stacks load the same fp32 adapter onto a base in that dtype.
Every system decodes the SAME 8 prompts (random token ids, lengths 64..200, left-padded) with
transformers' `generate`, greedy, exactly `--new-tokens` new tokens per row (EOS suppressed).
The adapters are LoRA r8, alpha 16 on q_proj and v_proj with random non-zero B (std 0.02), saved
in PEFT format and loaded by both stacks, so both run the same weights. Systems:

- base: the plain transformers model;
- peftkit merged: `AdaptedModel.merge_and_unload()` (plain layers again; the target is within 3% of base);
- peftkit merged, wrapped: `merge_adapter()`, the LoRA layers left in place (they skip their matmuls);
- peftkit unmerged: one adapter active;
- HF PEFT unmerged: `PeftModel` with the same adapter active (the reference);
- peftkit mixed: two adapters in one batch, rows alternating, through row routing (serve/routing.py);
- HF PEFT mixed: the same batch through `generate(adapter_names=[...])`.

Each system gets one warm-up batch, then `--rounds` timed rounds run round-robin (a change in
the machine's load hits every system alike); tokens/s = batch x new tokens / median batch time,
prefill included. Token agreement: rows whose greedy tokens equal HF PEFT's (same kind).

    flock /tmp/peftkit-heavy.lock nice -n 5 .venv/bin/python benchmarks/bench_generate.py
    python benchmarks/bench_generate.py --workloads synthetic --rounds 1 --no-results
    python benchmarks/bench_generate.py --workloads synthetic --profile "peftkit unmerged"
    python benchmarks/bench_generate.py --workloads smollm2-135m --dtypes fp32,bf16 --batch 1,8 \
        --systems "base,peftkit unmerged" --threads 2 --load 1 --no-results

`--load N` starts a second process that multiplies fp32 matrices on N threads for the whole run
(the contention of a shared machine, made repeatable); `--threads 1` vs `2` under it shows what
OpenMP's spin-waiting costs when a core is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_serve import interleaved, machine
from bench_train import synthetic_model

HERE = Path(__file__).resolve().parent
RANK, ALPHA, TARGETS, B_STD = 8, 16, ["q_proj", "v_proj"], 0.02
ADAPTERS = ("first", "second")
PEFT_SINGLE, PEFT_MIXED = "HF PEFT unmerged", "HF PEFT mixed, 2 adapters"
LENGTHS = (64, 200)


@dataclass
class System:
    """A model and how to call its `generate` for one batch."""

    model: torch.nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    reference: str | None = None
    """The HF PEFT system its tokens are compared with."""


# -- workloads ------------------------------------------------------------------------------------
def load_workload(name: str, folder: Path) -> tuple[torch.nn.Module, int]:
    """(base model in fp32, pad id)."""
    if name == "synthetic":
        from transformers import AutoModelForCausalLM

        synthetic_model(folder / "model")
        return AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32), 0
    from peftkit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer.pad_token_id


def make_prompts(vocab: int, batch: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of random token ids (no special tokens), lengths spread evenly over LENGTHS."""
    rng = random.Random(seed)
    low, high = LENGTHS
    lengths = [low + (high - low) * i // max(batch - 1, 1) for i in range(batch)]
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


def make_adapters(base: torch.nn.Module, root: Path) -> dict[str, Path]:
    """LoRA r8 adapters on q,v with random non-zero B, saved in PEFT format (one folder each)."""
    from peftkit import AdaptedModel, LoraConfig

    adapted = AdaptedModel(copy.deepcopy(base))
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for name in ADAPTERS:
        adapted.add_adapter(name, LoraConfig(r=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS))
        with torch.no_grad():
            for key, param in adapted.model.named_parameters():
                if f"lora_B.{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * B_STD)
        folders[name] = adapted.save_adapter(root / name, name)
    return folders


# -- the systems ----------------------------------------------------------------------------------
def peftkit_model(base: torch.nn.Module, folders: dict[str, Path], names: tuple[str, ...]) -> Any:
    from peftkit import AdaptedModel

    adapted = AdaptedModel(copy.deepcopy(base))
    for name in names:
        adapted.load_adapter(folders[name], name)
    adapted.set_adapter(names[0])
    return adapted.eval()


def build_systems(base: torch.nn.Module, folders: dict[str, Path], batch: int, only: list[str] | None) -> dict[str, System]:
    """Every system, or the named ones (`--systems`); each builds only when it is asked for."""
    from peft import PeftModel

    from peftkit.serve.routing import enable_row_routing

    rows = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]

    def peft() -> Any:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[ADAPTERS[0]]), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            model.load_adapter(str(folders[name]), adapter_name=name)
        model.set_adapter(ADAPTERS[0])
        return model.eval()

    def wrapped() -> Any:
        model = peftkit_model(base, folders, ADAPTERS[:1])
        model.merge_adapter()
        return model

    def mixed() -> System:
        model = peftkit_model(base, folders, ADAPTERS)
        routing = enable_row_routing(model)
        return System(model, context=lambda: routing.route(rows), reference=PEFT_MIXED)

    builders: dict[str, Callable[[], System]] = {
        "base": lambda: System(base.eval()),
        "peftkit merged (merge_and_unload)": lambda: System(
            peftkit_model(base, folders, ADAPTERS[:1]).merge_and_unload().eval(), reference=PEFT_SINGLE),
        "peftkit merged, wrapped (merge_adapter)": lambda: System(wrapped(), reference=PEFT_SINGLE),
        "peftkit unmerged": lambda: System(peftkit_model(base, folders, ADAPTERS[:1]), reference=PEFT_SINGLE),
        PEFT_SINGLE: lambda: System(peft()),
        "peftkit mixed, 2 adapters": mixed,
        PEFT_MIXED: lambda: System(peft(), kwargs={"adapter_names": rows}),
    }
    unknown = set(only or []) - set(builders)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from {list(builders)}")
    systems = {key: build() for key, build in builders.items() if only is None or key in only}
    for system in systems.values():
        if system.reference not in systems:
            system.reference = None
    return systems


def generate_fn(system: System, ids: torch.Tensor, mask: torch.Tensor, pad_id: int, new_tokens: int,
                outputs: dict[str, list[list[int]]], key: str) -> Callable[[], None]:
    @torch.no_grad()
    def run() -> None:
        with system.context():
            out = system.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=pad_id, **system.kwargs,
            )
        assert out.shape[1] == ids.shape[1] + new_tokens, "every row must get exactly new_tokens tokens"
        outputs[key] = out[:, ids.shape[1]:].tolist()
    return run


def profile(run: Callable[[], None], label: str) -> str:
    """The top operators of one batch by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return f"profile of {label}:\n{table}\n"


# -- report ---------------------------------------------------------------------------------------
def same_rows(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def workload_table(title: str, times: dict[str, list[float]], outputs: dict[str, list[list[int]]],
                   systems: dict[str, System], batch: int, new_tokens: int) -> str:
    first = next(iter(times))
    base = statistics.median(times["base" if "base" in times else first])
    lines = [
        f"### {title}", "",
        "| system | tokens/s (median) | batch time, median (s) | range (s) | x base tokens/s | rows differing from base | rows equal to HF PEFT |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, system in systems.items():
        median = statistics.median(times[key])
        ref = system.reference
        agree = f"{same_rows(outputs[key], outputs[ref])}/{batch}" if ref else "—"
        differ = f"{batch - same_rows(outputs[key], outputs['base'])}/{batch}" if key != "base" and "base" in outputs else "—"
        lines.append(f"| {key} | {batch * new_tokens / median:.1f} | {median:.2f} | {min(times[key]):.2f}–{max(times[key]):.2f} "
                     f"| {base / median:.3f} | {differ} | {agree} |")
    return "\n".join(lines) + "\n"


def report(tables: list[str], args: argparse.Namespace, loads: tuple[float, float], seconds: float) -> str:
    command = "flock /tmp/peftkit-heavy.lock nice -n 5 .venv/bin/python benchmarks/bench_generate.py " + " ".join(sys.argv[1:])
    return "\n".join([
        f"Command: `{command.strip()}`", "",
        (f"Machine: {machine()}. Run {time.strftime('%Y-%m-%d %H:%M %Z')}, {seconds:.0f} s in all; 1-minute load average "
         f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end (a shared machine: compare rows within one run)."), "",
        (f"Greedy `generate`, {args.dtypes}, batch {args.batch} prompts of {LENGTHS[0]}..{LENGTHS[1]} random tokens, exactly "
         f"{args.new_tokens} new tokens per row; LoRA r{RANK} alpha {ALPHA} on q,v with random B (std {B_STD}); "
         f"one warm-up batch per system, then {args.rounds} rounds round-robin; tokens/s from the median batch time "
         "(prefill included). Mixed rows alternate two adapters."
         + (f" A second process multiplied fp32 matrices on {args.load} thread(s) throughout." if args.load else "")), "",
        *tables,
    ])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOAD_SCRIPT = "import torch\ntorch.set_num_threads({threads})\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def competing_load(threads: int) -> subprocess.Popen:
    """A second process that keeps `threads` cores busy with fp32 matmuls until killed."""
    return subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT.format(threads=threads)])


def append_results(path: Path, text: str) -> None:
    existing = path.read_text() if path.exists() else ""
    heading = "" if "\n## Inference\n" in "\n" + existing else "\n## Inference\n"
    with path.open("a") as f:
        f.write(f"{heading}\n{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="synthetic,smollm2-135m", help="comma-separated: synthetic, smollm2-135m")
    parser.add_argument("--batch", default="8", help="batch size(s), comma-separated: 1,8")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--systems", help="comma-separated system names (default: all)")
    parser.add_argument("--load", type=int, default=0, help="threads of a competing matmul process run alongside (0: none)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 avoids OpenMP spin-waits on a busy CPU")
    parser.add_argument("--profile", metavar="SYSTEM", help="print a torch.profiler table of one batch of SYSTEM instead")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-results", action="store_true", help="print only; do not append to --results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from peftkit.generate import left_pad

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = args.systems.split(",") if args.systems else None
    competitor = competing_load(args.load) if args.load else None
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    tables = []
    try:
        for workload in args.workloads.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                fp32_base, pad_id = load_workload(workload, Path(tmp))
                folders = make_adapters(fp32_base, Path(tmp) / "adapters")
                for dtype_name in args.dtypes.split(","):
                    base = copy.deepcopy(fp32_base).to(DTYPES[dtype_name])
                    for batch in [int(b) for b in args.batch.split(",")]:
                        title = f"{workload}, {dtype_name}, batch {batch}"
                        ids, mask = left_pad(make_prompts(base.config.vocab_size, batch), pad_id)
                        systems = build_systems(base, folders, batch, only)
                        outputs: dict[str, list[list[int]]] = {}
                        runs = {key: generate_fn(s, ids, mask, pad_id, args.new_tokens, outputs, key) for key, s in systems.items()}
                        if args.profile:
                            sys.stdout.write(profile(runs[args.profile], f"{args.profile} on {title}"))
                            continue
                        times = interleaved(runs, args.rounds)
                        tables.append(workload_table(title, times, outputs, systems, batch, args.new_tokens))
                        print(tables[-1], flush=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if args.profile:
        return
    text = report(tables, args, (load_start, os.getloadavg()[0]), time.perf_counter() - start)
    sys.stdout.write("\n" + text)
    if not args.no_results:
        append_results(args.results, text)


if __name__ == "__main__":
    main()
