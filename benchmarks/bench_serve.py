"""Serving speed, side by side in one run: base, one merged adapter, one unmerged adapter, a mix of four.

peftkit's engine (KV-cache decode loop, row-routed LoRA) and HF PEFT + transformers `generate`
(`adapter_names=` for the mix) decode the same token ids: batch 8, greedy, exactly 32 new
tokens per row (EOS ignored), SmolLM2-135M in fp32. The four adapters are LoRA r16 on q,v with
random, non-zero B (speed does not depend on training). Each mode: one warm-up batch, then
`--repeats` timed batches; latency is the wall time of a batch (every request in it finishes then).

    nice -n 10 python benchmarks/bench_serve.py                  # writes benchmarks/RESULTS-serving.md
    python benchmarks/bench_serve.py --repeats 1 --no-peft --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ADAPTERS = [f"task{i}" for i in range(4)]
ABSTRACTS = [
    "We study abstractive summarization of scientific papers and propose a model that reads the full text.",
    "This paper introduces a dataset of 10,000 dialogues annotated with intents and evaluates strong baselines on it.",
    "Low-resource machine translation suffers from scarce parallel data; we use back-translation and pretrained encoders.",
    "We present a parser that handles long-distance dependencies with a transition system and a neural scorer.",
    "Named entity recognition across domains is hard; our adapter-based method transfers with only 100 labelled sentences.",
    "We analyse gender bias in coreference systems and show that data augmentation reduces it without hurting accuracy.",
    "Question answering over tables needs numerical reasoning; we add executable programs and improve accuracy by 9 points.",
    "Our results show that instruction tuning on a mixture of tasks improves zero-shot generalisation of small models.",
]


def make_adapters(base: torch.nn.Module, root: Path) -> dict[str, Path]:
    """Four LoRA r16 adapters on q,v with random non-zero B, saved in PEFT format."""
    from peftkit import AdaptedModel, LoraConfig

    adapted = AdaptedModel(base)
    folders = {}
    g = torch.Generator().manual_seed(0)
    for name in ADAPTERS:
        adapted.add_adapter(name, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for key, p in adapted.model.named_parameters():
                if f"lora_B.{name}." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        folders[name] = adapted.save_adapter(root / name, name)
    for name in ADAPTERS:
        adapted.delete_adapter(name)
    return folders


def interleaved(runs: dict[tuple[str, str], Callable[[], None]], repeats: int) -> dict[tuple[str, str], list[float]]:
    """Warm every mode up once, then time them round-robin, so a change in the machine's load hits all alike."""
    for run in runs.values():
        run()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return times


# -- peftkit -------------------------------------------------------------------------------------
def peftkit_runs(model_name: str, folders: dict[str, Path], prompts: list[list[int]], new_tokens: int, outputs: dict):
    """Mode -> one batch through peftkit's engine (a second engine holds the merged adapter)."""
    from peftkit.models import load_model
    from peftkit.serve import Engine, SamplingParams, ServeSettings

    def engine_with(names: list[str]) -> Engine:
        base, tokenizer = load_model(model_name)
        engine = Engine(base, tokenizer, model_name, ServeSettings(max_batch_size=len(prompts)))
        for name in names:
            engine.load_adapter(name, folders[name])
        return engine

    engine, merged = engine_with(ADAPTERS), engine_with(ADAPTERS[:1])
    merged.merge_only(ADAPTERS[0])
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def batch(mode: str, on: Engine, models: list[str]) -> Callable[[], None]:
        def run() -> None:
            seqs = [on.sequence(m, list(p), params) for m, p in zip(models, prompts)]
            on.run_batch(seqs)
            outputs[mode] = [s.tokens for s in seqs]
        return run

    n = len(prompts)
    return {
        "base only": batch("base only", engine, [model_name] * n),
        "one adapter, merged": batch("one adapter, merged", merged, [ADAPTERS[0]] * n),
        "one adapter, unmerged": batch("one adapter, unmerged", engine, [ADAPTERS[0]] * n),
        "mix of four adapters": batch("mix of four adapters", engine, [ADAPTERS[i % 4] for i in range(n)]),
    }


# -- HF PEFT -------------------------------------------------------------------------------------
def peft_runs(model_name: str, folders: dict[str, Path], prompts: list[list[int]], new_tokens: int, outputs: dict):
    """Mode -> one batch through PeftModel.generate (a second PeftModel holds the merged adapter)."""
    from peft import PeftModel

    from peftkit.generate import left_pad
    from peftkit.models import load_model

    def peft_with(names: list[str]) -> PeftModel:
        base, _ = load_model(model_name)
        model = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(folders[name]), adapter_name=name)
        model.set_adapter(names[0])
        return model.eval()

    model, merged = peft_with(ADAPTERS), peft_with(ADAPTERS[:1])
    merged.merge_adapter([ADAPTERS[0]])  # still wrapped by PEFT, as a PEFT deployment keeps it
    _, tokenizer = load_model(model_name)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def batch(mode: str, on: PeftModel, base: bool = False, **extra) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            with on.disable_adapter() if base else contextlib.nullcontext():
                outputs[mode] = on.generate(**kwargs, **extra)[:, ids.shape[1]:].tolist()
        return run

    return {
        "base only": batch("base only", model, base=True),
        "one adapter, merged": batch("one adapter, merged", merged),
        "one adapter, unmerged": batch("one adapter, unmerged", model),
        "mix of four adapters": batch("mix of four adapters", model, adapter_names=[ADAPTERS[i % 4] for i in range(len(prompts))]),
    }


# -- report --------------------------------------------------------------------------------------
def agreement(a: list[list[int]], b: list[list[int]], eos: int) -> int:
    """Rows whose greedy tokens agree up to the first EOS (HF's min_new_tokens forbids EOS, peftkit emits it)."""
    def head(row: list[int]) -> list[int]:
        return row[: row.index(eos)] if eos in row else row
    return sum(head(x)[: len(head(y))] == head(y)[: len(head(x))] for x, y in zip(a, b))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


HEADER = ("| mode | tokens/s (median) | tokens/s (best) | requests/s | latency (s, median) | latency range (s) | time vs base |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
ORDER = ["base only", "one adapter, merged", "one adapter, unmerged", "mix of four adapters"]


def row(mode: str, times: list[float], base_times: list[float], batch: int, new_tokens: int) -> str:
    latency = statistics.median(times)
    return (f"| {mode} | {batch * new_tokens / latency:.1f} | {batch * new_tokens / min(times):.1f} | {batch / latency:.2f} "
            f"| {latency:.2f} | {min(times):.2f}–{max(times):.2f} | {latency / statistics.median(base_times):.2f}× |")


def overhead(times: dict[str, list[float]], mode: str) -> str:
    """`mode`'s batch time over the base's (median, and best-of), and whether the two ranges overlap."""
    base, other = times["base only"], times[mode]
    overlap = min(other) <= max(base) and min(base) <= max(other)
    return (f"**{statistics.median(other) / statistics.median(base):.2f}×** (best-of: {min(other) / min(base):.2f}×"
            f"{'; the ranges overlap, so within noise' if overlap else ''})")


def stack_section(title: str, note: str, times: dict[str, list[float]], batch: int, n: int) -> list[str]:
    return [f"## {title}", "", note, "", HEADER, *[row(m, times[m], times["base only"], batch, n) for m in ORDER], ""]


def write_report(out: Path, args: argparse.Namespace, ours: dict, theirs: dict | None, agree: dict, loads: tuple, seconds: float) -> str:
    batch, n = args.batch_size, args.new_tokens
    threads = f" --threads {args.threads}" if args.threads else ""
    lines = [
        "# Serving benchmark: one base, many adapters", "",
        f"Command: `nice -n 10 python benchmarks/bench_serve.py --batch-size {batch} --new-tokens {n} --repeats {args.repeats}{threads}`", "",
        f"Machine: {machine()}. Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all.", "",
        f"**Noisy numbers**: the machine was shared with other engineers' jobs during the run (1-minute load average "
        f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end, on {os.cpu_count()} cores), and this run was niced. "
        "Absolute speeds are far below what the CPU does alone; the modes were timed round-robin so load changes hit "
        "them alike: compare rows within this run, not with other runs.", "",
        f"Workload: SmolLM2-135M (`{args.model}`), fp32, batch {batch}, greedy, exactly {n} new tokens per request "
        f"(EOS ignored), the same {batch} prompts (token ids) for every mode and both stacks; four LoRA r16 adapters on q,v "
        f"with random non-zero B. One warm-up batch per mode, then {args.repeats} timed rounds; a batch's requests all "
        "arrive together, so a request's latency = its batch's wall time.", "",
        *stack_section("peftkit serve engine (KV-cache decode loop, row-routed LoRA)",
                       "Merged: `--merge` (the adapter folded into the weights, plain layers); mix: the rows use adapters 0, 1, 2, 3, 0, 1, ... in one batch.",
                       ours, batch, n),
    ]
    if theirs is not None:
        lines += stack_section("HF PEFT 0.21 + transformers generate (same token ids)",
                               "Mix: `generate(adapter_names=[...])`; merged: `merge_adapter()` with the PEFT wrapper kept; base: `disable_adapter()`.",
                               theirs, batch, n)
        lines += ["Greedy agreement, peftkit vs PEFT (rows equal up to the first EOS): "
                  + ", ".join(f"{m}: {agree[m]}/{batch}" for m in ORDER), ""]
    lines += ["## Closing note", "",
              f"Mixed-batch overhead (peftkit, four adapters in one batch vs the base alone, batch time ratio): "
              f"{overhead(ours, 'mix of four adapters')}. One unmerged adapter: {overhead(ours, 'one adapter, unmerged')}; "
              f"merged: {overhead(ours, 'one adapter, merged')}."]
    if theirs is not None:
        lines.append(f"HF PEFT on the same batches: mix {overhead(theirs, 'mix of four adapters')}; "
                     f"unmerged {overhead(theirs, 'one adapter, unmerged')}; merged (wrapped) {overhead(theirs, 'one adapter, merged')}. "
                     f"peftkit's mix vs PEFT's mix: {statistics.median(theirs['mix of four adapters']) / statistics.median(ours['mix of four adapters']):.2f}× "
                     "the speed (median batch times).")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); 1 avoids OpenMP spin-waits on a busy shared CPU.")
    parser.add_argument("--no-peft", action="store_true", help="Skip the HF PEFT columns.")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-serving.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from peftkit.models import load_model

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    base, tokenizer = load_model(args.model)
    texts = [ABSTRACTS[i % len(ABSTRACTS)] for i in range(args.batch_size)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(base, Path(tmp))
        del base
        our_tokens: dict = {}
        their_tokens: dict = {}
        runs = {("peftkit", m): r for m, r in peftkit_runs(args.model, folders, prompts, args.new_tokens, our_tokens).items()}
        if not args.no_peft:
            runs.update({("peft", m): r for m, r in peft_runs(args.model, folders, prompts, args.new_tokens, their_tokens).items()})
        times = interleaved(runs, args.repeats)
    ours = {m: t for (stack, m), t in times.items() if stack == "peftkit"}
    theirs = {m: t for (stack, m), t in times.items() if stack == "peft"} or None
    agree = {m: agreement(our_tokens[m], their_tokens[m], tokenizer.eos_token_id) for m in their_tokens}
    text = write_report(args.out, args, ours, theirs, agree, (load_start, os.getloadavg()[0]), time.perf_counter() - start)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
