"""Greedy generation speed: the base model vs peftkit LoRA (merged, unmerged, mixed) vs HF PEFT.

One invocation measures two workloads, each in fp32 on the CPU: the synthetic Llama of
bench_train.py (hidden 512, 8 layers, vocab 32,000, seed 0) and the default model SmolLM2-135M.
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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
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


def build_systems(base: torch.nn.Module, folders: dict[str, Path], batch: int) -> dict[str, System]:
    from peft import PeftModel

    from peftkit.serve.routing import enable_row_routing

    rows = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]
    merged = peftkit_model(base, folders, ADAPTERS[:1]).merge_and_unload()
    wrapped = peftkit_model(base, folders, ADAPTERS[:1])
    wrapped.merge_adapter()
    mixed = peftkit_model(base, folders, ADAPTERS)
    routing = enable_row_routing(mixed)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[ADAPTERS[0]]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft.load_adapter(str(folders[name]), adapter_name=name)
    peft.set_adapter(ADAPTERS[0])
    peft.eval()
    return {
        "base": System(base.eval()),
        "peftkit merged (merge_and_unload)": System(merged.eval(), reference=PEFT_SINGLE),
        "peftkit merged, wrapped (merge_adapter)": System(wrapped, reference=PEFT_SINGLE),
        "peftkit unmerged": System(peftkit_model(base, folders, ADAPTERS[:1]), reference=PEFT_SINGLE),
        PEFT_SINGLE: System(peft),
        "peftkit mixed, 2 adapters": System(mixed, context=lambda: routing.route(rows), reference=PEFT_MIXED),
        PEFT_MIXED: System(peft, kwargs={"adapter_names": rows}),
    }


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


def workload_table(workload: str, times: dict[str, list[float]], outputs: dict[str, list[list[int]]],
                   systems: dict[str, System], batch: int, new_tokens: int) -> str:
    base = statistics.median(times["base"])
    lines = [
        f"### {workload}", "",
        "| system | tokens/s (median) | batch time, median (s) | range (s) | x base tokens/s | rows differing from base | rows equal to HF PEFT |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, system in systems.items():
        median = statistics.median(times[key])
        ref = system.reference
        agree = f"{same_rows(outputs[key], outputs[ref])}/{batch}" if ref else "—"
        differ = f"{batch - same_rows(outputs[key], outputs['base'])}/{batch}" if key != "base" else "—"
        lines.append(f"| {key} | {batch * new_tokens / median:.1f} | {median:.2f} | {min(times[key]):.2f}–{max(times[key]):.2f} "
                     f"| {base / median:.3f} | {differ} | {agree} |")
    return "\n".join(lines) + "\n"


def report(tables: list[str], args: argparse.Namespace, loads: tuple[float, float], seconds: float) -> str:
    command = "flock /tmp/peftkit-heavy.lock nice -n 5 .venv/bin/python benchmarks/bench_generate.py " + " ".join(sys.argv[1:])
    return "\n".join([
        f"Command: `{command.strip()}`", "",
        (f"Machine: {machine()}. Run {time.strftime('%Y-%m-%d %H:%M %Z')}, {seconds:.0f} s in all; 1-minute load average "
         f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end (a shared machine: compare rows within one run)."), "",
        (f"Greedy `generate`, fp32, batch {args.batch} prompts of {LENGTHS[0]}..{LENGTHS[1]} random tokens, exactly "
         f"{args.new_tokens} new tokens per row; LoRA r{RANK} alpha {ALPHA} on q,v with random B (std {B_STD}); "
         f"one warm-up batch per system, then {args.rounds} rounds round-robin; tokens/s from the median batch time "
         "(prefill included). Mixed rows alternate two adapters."), "",
        *tables,
    ])


def append_results(path: Path, text: str) -> None:
    existing = path.read_text() if path.exists() else ""
    heading = "" if "\n## Inference\n" in "\n" + existing else "\n## Inference\n"
    with path.open("a") as f:
        f.write(f"{heading}\n{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="synthetic,smollm2-135m", help="comma-separated: synthetic, smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
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
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    tables = []
    for workload in args.workloads.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            base, pad_id = load_workload(workload, Path(tmp))
            prompts = make_prompts(base.config.vocab_size, args.batch)
            ids, mask = left_pad(prompts, pad_id)
            systems = build_systems(base, make_adapters(base, Path(tmp) / "adapters"), args.batch)
            outputs: dict[str, list[list[int]]] = {}
            runs = {key: generate_fn(s, ids, mask, pad_id, args.new_tokens, outputs, key) for key, s in systems.items()}
            if args.profile:
                sys.stdout.write(profile(runs[args.profile], f"{args.profile} on {workload}"))
                continue
            times = interleaved(runs, args.rounds)
        tables.append(workload_table(workload, times, outputs, systems, args.batch, args.new_tokens))
        print(tables[-1], flush=True)
    if args.profile:
        return
    text = report(tables, args, (load_start, os.getloadavg()[0]), time.perf_counter() - start)
    sys.stdout.write("\n" + text)
    if not args.no_results:
        append_results(args.results, text)


if __name__ == "__main__":
    main()
