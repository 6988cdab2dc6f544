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


def timed(run_batch: Callable[[], None], repeats: int) -> list[float]:
    run_batch()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_batch()
        times.append(time.perf_counter() - start)
    return times


# -- peftkit -------------------------------------------------------------------------------------
def peftkit_modes(model_name: str, folders: dict[str, Path], prompts: list[list[int]], new_tokens: int, repeats: int):
    from peftkit.models import load_model
    from peftkit.serve import Engine, SamplingParams, ServeSettings

    base, tokenizer = load_model(model_name)
    engine = Engine(base, tokenizer, model_name, ServeSettings(max_batch_size=len(prompts)))
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[list[int]]] = {}

    def batch(mode: str, models: list[str]) -> Callable[[], None]:
        def run() -> None:
            seqs = [engine.sequence(m, list(p), params) for m, p in zip(models, prompts)]
            engine.run_batch(seqs)
            outputs[mode] = [s.tokens for s in seqs]
        return run

    mix = [ADAPTERS[i % 4] for i in range(len(prompts))]
    results = {
        "base only": timed(batch("base only", [model_name] * len(prompts)), repeats),
        "one adapter, unmerged": timed(batch("one adapter, unmerged", [ADAPTERS[0]] * len(prompts)), repeats),
        "mix of four adapters": timed(batch("mix of four adapters", mix), repeats),
    }
    for name in ADAPTERS[1:]:
        engine.unload_adapter(name)
    engine.merge_only(ADAPTERS[0])
    results["one adapter, merged"] = timed(batch("one adapter, merged", [ADAPTERS[0]] * len(prompts)), repeats)
    return results, outputs


# -- HF PEFT -------------------------------------------------------------------------------------
def peft_modes(model_name: str, folders: dict[str, Path], prompts: list[list[int]], new_tokens: int, repeats: int):
    from peft import PeftModel

    from peftkit.generate import left_pad
    from peftkit.models import load_model

    base, tokenizer = load_model(model_name)
    model = PeftModel.from_pretrained(base, str(folders[ADAPTERS[0]]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.eval()
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    outputs: dict[str, list[list[int]]] = {}

    def batch(mode: str, **extra) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            outputs[mode] = model.generate(**kwargs, **extra)[:, ids.shape[1]:].tolist()
        return run

    def base_run() -> None:
        with model.disable_adapter():
            batch("base only")()

    mix = [ADAPTERS[i % 4] for i in range(len(prompts))]
    model.set_adapter(ADAPTERS[0])
    results = {
        "base only": timed(base_run, repeats),
        "one adapter, unmerged": timed(batch("one adapter, unmerged"), repeats),
        "mix of four adapters": timed(batch("mix of four adapters", adapter_names=mix), repeats),
    }
    model.merge_adapter([ADAPTERS[0]])  # still wrapped by PEFT: what a PEFT deployment keeps
    results["one adapter, merged"] = timed(batch("one adapter, merged"), repeats)
    return results, outputs


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


def row(mode: str, times: list[float], batch: int, new_tokens: int, base_tps: float) -> str:
    latency = statistics.median(times)
    tps = batch * new_tokens / latency
    return f"| {mode} | {tps:.0f} | {batch / latency:.2f} | {latency:.2f} | {min(times):.2f}–{max(times):.2f} | {tps / base_tps:.2f}× |"


def write_report(out: Path, args: argparse.Namespace, ours: dict, theirs: dict | None, agree: dict, loads: tuple, seconds: float) -> str:
    batch, n = args.batch_size, args.new_tokens
    header = "| mode | generated tokens/s | requests/s | latency (s, median) | latency range (s) | vs base |\n|---|---:|---:|---:|---:|---:|"
    order = ["base only", "one adapter, merged", "one adapter, unmerged", "mix of four adapters"]
    tps = {k: batch * n / statistics.median(v) for k, v in ours.items()}
    lines = [
        "# Serving benchmark: one base, many adapters", "",
        f"Command: `nice -n 10 python benchmarks/bench_serve.py --batch-size {batch} --new-tokens {n} --repeats {args.repeats}`", "",
        f"Machine: {machine()}. Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all.", "",
        f"**Noisy numbers**: the machine was shared with other engineers' jobs during the run (1-minute load average "
        f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end, on {os.cpu_count()} cores). Compare rows within a run, not across runs.", "",
        f"Workload: SmolLM2-135M (`{args.model}`), fp32, batch {batch}, greedy, exactly {n} new tokens per request "
        "(EOS ignored), the same 8 prompts (token ids) for every mode and both stacks; four LoRA r16 adapters on q,v "
        f"with random non-zero B. One warm-up batch, then {args.repeats} timed batches per mode; a batch's requests all "
        "arrive together, so latency = batch wall time.", "",
        "## peftkit serve engine (KV-cache decode loop, row-routed LoRA)", "", header,
        *[row(m, ours[m], batch, n, tps["base only"]) for m in order], "",
    ]
    if theirs is not None:
        their_tps = batch * n / statistics.median(theirs["base only"])
        lines += ["## HF PEFT 0.21 + transformers generate (same token ids)", "",
                  "Mix: `generate(adapter_names=[...])`; merged: `merge_adapter()` with the PEFT wrapper kept; base: `disable_adapter()`.", "",
                  header, *[row(m, theirs[m], batch, n, their_tps) for m in order], "",
                  "Greedy agreement, peftkit vs PEFT (rows equal up to the first EOS): "
                  + ", ".join(f"{m}: {agree[m]}/{batch}" for m in order), ""]
    overhead = tps["base only"] / tps["mix of four adapters"]
    lines += ["## Closing note", "",
              f"Mixed-batch overhead (peftkit): base-only throughput / four-adapter-mix throughput = **{overhead:.2f}×** "
              f"(the mix runs at {1 / overhead:.2f}× the base's tokens/s). One unmerged adapter: "
              f"{tps['base only'] / tps['one adapter, unmerged']:.2f}×; merged: {tps['base only'] / tps['one adapter, merged']:.2f}×."]
    if theirs is not None:
        their = {k: batch * n / statistics.median(v) for k, v in theirs.items()}
        lines.append(f"HF PEFT: mix overhead {their['base only'] / their['mix of four adapters']:.2f}×; peftkit's mix vs PEFT's mix: "
                     f"{tps['mix of four adapters'] / their['mix of four adapters']:.2f}× the tokens/s.")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peft", action="store_true", help="Skip the HF PEFT columns.")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-serving.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peftkit.models import load_model

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    base, tokenizer = load_model(args.model)
    texts = [ABSTRACTS[i % len(ABSTRACTS)] for i in range(args.batch_size)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(base, Path(tmp))
        del base
        ours, our_tokens = peftkit_modes(args.model, folders, prompts, args.new_tokens, args.repeats)
        theirs, agree = None, {}
        if not args.no_peft:
            theirs, their_tokens = peft_modes(args.model, folders, prompts, args.new_tokens, args.repeats)
            agree = {m: agreement(our_tokens[m], their_tokens[m], tokenizer.eos_token_id) for m in our_tokens}
    text = write_report(args.out, args, ours, theirs, agree, (load_start, os.getloadavg()[0]), time.perf_counter() - start)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
