"""Serving speed, side by side in one run: base, one merged adapter, one unmerged adapter, a mix of four.

peftkit's engine (KV-cache decode loop, row-routed LoRA) and HF PEFT + transformers `generate`
(`adapter_names=` for the mix) decode the same token ids: batch 8, greedy, exactly 32 new
tokens per row (EOS ignored), SmolLM2-135M in fp32. The four adapters are LoRA r16 on q,v with
random, non-zero B (speed does not depend on training). Each mode: one warm-up batch, then
`--repeats` timed batches; latency is the wall time of a batch (every request in it finishes then).

    nice -n 10 python benchmarks/bench_serve.py                  # writes benchmarks/RESULTS-serving.md
    python benchmarks/bench_serve.py --repeats 1 --no-peft --out /tmp/r.md

`--load` measures the server instead: continuous vs static batching over HTTP on 127.0.0.1, Poisson
arrivals at three rates (TTFT and end-to-end percentiles, tokens/s, abandoned-request recovery); its
section of RESULTS-serving.md is replaced, the rest kept.

    nice -n 10 python benchmarks/bench_serve.py --load --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

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


def make_adapters(base: torch.nn.Module, root: Path, names: list[str] = ADAPTERS, rank: int = 16) -> dict[str, Path]:
    """LoRA adapters on q,v with random non-zero B (four r16 ones by default), saved in PEFT format."""
    from peftkit import AdaptedModel, LoraConfig

    adapted = AdaptedModel(base)
    folders = {}
    g = torch.Generator().manual_seed(0)
    for name in names:
        adapted.add_adapter(name, LoraConfig(r=rank, alpha=2 * rank, dropout=0.0, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for key, p in adapted.model.named_parameters():
                if f"lora_B.{name}." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        folders[name] = adapted.save_adapter(root / name, name)
    for name in names:
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
    earlier = out.read_text() if out.exists() else ""
    load = earlier[earlier.index(LOAD_BEGIN): earlier.index(LOAD_END) + len(LOAD_END)] if LOAD_BEGIN in earlier else ""
    out.write_text(text + ("\n" + load + "\n" if load else ""))
    return text


# -- continuous vs static batching under a Poisson load ------------------------------------------
LOAD_BEGIN, LOAD_END = "<!-- load: bench_serve.py --load -->", "<!-- /load -->"
LOAD_ADAPTERS = ADAPTERS[:3]


def synthetic_model(tokenizer, hidden: int, layers: int) -> torch.nn.Module:
    """A small Llama-shaped model on the tokenizer's vocabulary (random weights: speed does not depend on training)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def load_workload(count: int, rate: float, seed: int, vocab: int, max_tokens: tuple[int, ...]) -> list[dict]:
    """`count` requests: Poisson arrivals at `rate` per second, mixed models (base + adapters), prompt lengths
    16-256 tokens, max_tokens drawn from `max_tokens` (EOS ignored, so each request generates exactly that)."""
    rng = random.Random(seed)
    at, jobs = 0.0, []
    for i in range(count):
        at += rng.expovariate(rate)
        jobs.append({"at": at, "model": (["base"] + LOAD_ADAPTERS)[i % 4], "max_tokens": rng.choice(max_tokens),
                     "prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(16, 256))]})
    return jobs


class LoadServer:
    """A real uvicorn on 127.0.0.1 (a free port) serving one engine, in a thread of this process."""

    def __init__(self, engine) -> None:
        import uvicorn

        from peftkit.serve import create_app

        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def one_request(http, job: dict, start: float) -> dict:
    """Send `job` at its arrival time (streamed); time to the first chunk and to the end."""
    await asyncio.sleep(max(0.0, start + job["at"] - time.monotonic()))
    body = {"model": job["model"], "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent, first, tokens = time.monotonic(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            first = first or time.monotonic()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first - sent, "e2e": time.monotonic() - sent, "tokens": tokens, "end": time.monotonic()}


async def abandoned_then_probe(url: str, model: str, abandoned: int, long_tokens: int) -> float:
    """The issue's scenario: `abandoned` clients time out on long non-streaming requests; seconds a 4-token request then takes."""
    import httpx

    body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": long_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=0.3) as http:
        async def abandon() -> None:
            try:
                await http.post("/v1/completions", json=body)
            except httpx.TimeoutException:
                pass
        await asyncio.gather(*(abandon() for _ in range(abandoned)))
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        started = time.monotonic()
        r = await http.post("/v1/completions", json={**body, "max_tokens": 4})
        assert r.status_code == 200, r.text
        return time.monotonic() - started


def replay(url: str, jobs: list[dict]) -> list[dict]:
    """Send every job at its arrival time (runs in the client process)."""
    import httpx

    async def send_all() -> list[dict]:
        limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
        async with httpx.AsyncClient(base_url=url, timeout=1200, limits=limits) as http:
            start = time.monotonic()
            results = await asyncio.gather(*(one_request(http, job, start) for job in jobs))
            return [{**r, "start": start} for r in results]

    return asyncio.run(send_all())


def run_load(client: Any, url: str, jobs: list[dict]) -> dict:
    """Replay the arrivals against `url` from the client process (so the client does not share the server's
    interpreter lock); percentiles of TTFT and end-to-end latency, generated tokens/s."""
    results = client.apply(replay, (url, jobs))
    ttft, e2e = sorted(r["ttft"] for r in results), sorted(r["e2e"] for r in results)
    span = max(r["end"] for r in results) - results[0]["start"]
    return {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), "e2e_p50": percentile(e2e, 50),
            "e2e_p99": percentile(e2e, 99), "tokens_per_s": sum(r["tokens"] for r in results) / span, "span": span}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def load_engine(base, tokenizer, folders: dict[str, Path], batching: str, batch_size: int):
    from peftkit.serve import Engine, ServeSettings

    settings = ServeSettings(batching=batching, max_batch_size=batch_size, max_wait_ms=10, max_concurrent=4096,
                             max_prompt_tokens=512, max_tokens_limit=512, kv_cache_tokens=batch_size * 768)
    engine = Engine(base, tokenizer, "base", settings)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    return engine


def load_benchmark(args: argparse.Namespace) -> str:
    """Continuous vs static batching, same engine settings, same arrivals, interleaved per rate."""
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    with multiprocessing.get_context("spawn").Pool(1) as client:  # started before any server thread exists
        return run_load_benchmark(args, client, started, load_start)


def run_load_benchmark(args: argparse.Namespace, client: Any, started: float, load_start: float) -> str:
    from peftkit.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(args.model))
    max_tokens = tuple(int(t) for t in args.load_max_tokens.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(synthetic_model(tokenizer, args.load_hidden, args.load_layers), Path(tmp), LOAD_ADAPTERS, rank=8)
        engines = {mode: load_engine(synthetic_model(tokenizer, args.load_hidden, args.load_layers), tokenizer, folders, mode,
                                     args.batch_size) for mode in ("static", "continuous")}
        results, recovery = {}, {}
        for mode, engine in engines.items():  # warm-up: allocator, stacked adapter weights
            with LoadServer(engine) as url:
                run_load(client, url, load_workload(8, 50.0, 99, len(tokenizer), max_tokens))
        for rate in args.rates:
            for mode, engine in engines.items():
                with LoadServer(engine) as url:
                    results[(rate, mode)] = run_load(client, url, load_workload(args.requests, rate, 1, len(tokenizer), max_tokens))
                    print(f"rate {rate}/s {mode}: {results[(rate, mode)]}", flush=True)
        for mode, engine in engines.items():
            with LoadServer(engine) as url:
                recovery[mode] = asyncio.run(abandoned_then_probe(url, "task0", 2, 300))
                recovery[f"{mode} cancelled"] = engine.stats["cancelled"]
    return load_section(args, results, recovery, (load_start, os.getloadavg()[0]), time.perf_counter() - started, max_tokens)


def load_section(args, results: dict, recovery: dict, loads: tuple, seconds: float, max_tokens: tuple[int, ...]) -> str:
    rows = ["| arrivals/s | batcher | TTFT p50 (s) | TTFT p99 (s) | e2e p50 (s) | e2e p99 (s) | generated tokens/s |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for (rate, mode), r in results.items():
        rows.append(f"| {rate:g} | {mode} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['e2e_p50']:.2f} | {r['e2e_p99']:.2f} "
                    f"| {r['tokens_per_s']:.0f} |")
    middle = args.rates[len(args.rates) // 2]
    static, continuous = results[(middle, "static")], results[(middle, "continuous")]
    rates = " ".join(f"{r:g}" for r in args.rates)
    return "\n".join([
        LOAD_BEGIN, "## Continuous vs static batching under a Poisson load", "",
        f"Command: `nice -n 10 python benchmarks/bench_serve.py --load --rates {rates} --requests {args.requests} "
        f"--batch-size {args.batch_size} --threads {args.threads or 0}`", "",
        f"Machine: {machine()}. Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all; 1-minute load "
        f"average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end. The runs take minutes each, one after the other, "
        "on a shared machine whose load drifts: compare the two batchers at the same rate, and trust the direction of a "
        "difference more than its size.", "",
        f"Workload: a real uvicorn on 127.0.0.1, streamed `/v1/completions` from an asyncio client; {args.requests} requests "
        f"per run with Poisson arrivals (the same arrival times, prompts and lengths for both batchers), cycling through the "
        f"base and three LoRA r8 adapters (mixed in one batch); prompts of 16-256 random token ids; exactly "
        f"{'/'.join(map(str, max_tokens))} new tokens (EOS ignored, chosen at random). Model: a Llama-shaped "
        f"{args.load_layers}-layer, hidden-{args.load_hidden} network on SmolLM2's 49,152-token vocabulary (random weights; "
        f"on this CPU SmolLM2-135M itself decodes ~15 tokens/s under load, too slow for hundreds of requests). fp32, greedy, "
        f"`--max-batch-size {args.batch_size}`, static batches wait at most 10 ms for company, KV budget {args.batch_size * 768} tokens. "
        "TTFT = time to the first streamed chunk; tokens/s = all generated tokens / (last answer - first arrival).", "",
        *rows, "",
        f"At the middle rate ({middle:g}/s): p99 TTFT static / continuous = **{static['ttft_p99'] / continuous['ttft_p99']:.1f}x**; "
        f"throughput continuous / static = **{continuous['tokens_per_s'] / static['tokens_per_s']:.2f}x**.", "",
        "Abandoned requests (the issue's case): two clients time out after 0.3 s on 300-token non-streaming requests; a 4-token "
        f"request sent right after took **{recovery['static']:.2f} s** (static) and **{recovery['continuous']:.2f} s** "
        f"(continuous); the servers cancelled {recovery['static cancelled']} and {recovery['continuous cancelled']} sequences "
        "whose clients had gone (each stops at the next decode step).", LOAD_END, ""])


def replace_load_section(out: Path, section: str) -> None:
    """Put the load section into the results file, replacing an earlier one (the modes report is kept)."""
    text = out.read_text() if out.exists() else ""
    if LOAD_BEGIN in text:
        text = text[: text.index(LOAD_BEGIN)] + text[text.index(LOAD_END) + len(LOAD_END):].lstrip("\n")
    out.write_text(text.rstrip("\n") + "\n\n" + section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); 1 avoids OpenMP spin-waits on a busy shared CPU.")
    parser.add_argument("--no-peft", action="store_true", help="Skip the HF PEFT columns.")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-serving.md")
    parser.add_argument("--load", action="store_true", help="Continuous vs static batching under Poisson arrivals instead.")
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="--load: arrivals per second.")
    parser.add_argument("--requests", type=int, default=120, help="--load: requests per run.")
    parser.add_argument("--load-max-tokens", default="16,64,128", help="--load: new tokens per request, drawn from these.")
    parser.add_argument("--load-hidden", type=int, default=256)
    parser.add_argument("--load-layers", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load:
        section = load_benchmark(args)
        replace_load_section(args.out, section)
        sys.stdout.write(section)
        return
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
