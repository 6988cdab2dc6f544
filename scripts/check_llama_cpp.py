"""`peftkit export` checked in llama.cpp: the default model and an adapter trained on the default task.

Exports the base (f32), the merged model (f32 and q8_0) and the LoRA adapter alone (f32); formats the
first N aclsum/outcome test prompts exactly as training did; decodes them greedily in peftkit and in
llama.cpp (llama-cpp-python, from the same token ids) and reports file sizes, load times, decode
tokens/s, and greedy agreement (identical outputs, and the share of peftkit's tokens llama.cpp
reproduced before the first difference). Also: does llama.cpp tokenize the prompt text the same way?

Usage (needs the llamacpp extra):
    nice -n 10 .venv/bin/python scripts/check_llama_cpp.py runs/default/adapter --out-dir /tmp/export-check
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from peftkit.config import load_config
from peftkit.data import load_task
from peftkit.data.datasets import prompt_ids
from peftkit.data.templates import format_prompt
from peftkit.export import export_gguf, export_lora_gguf
from peftkit.export.llama_cpp import greedy, load_gguf
from peftkit.generate import generate_ids
from peftkit.artifacts import load_artifact


def agreement(expected: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    """Identical outputs, and peftkit tokens reproduced before the first difference (share of all)."""
    prefix = 0
    for a, b in zip(expected, got):
        prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"identical": sum(a == b for a, b in zip(expected, got)) / len(expected),
            "tokens_before_first_difference": prefix / max(1, sum(len(a) for a in expected))}


def peftkit_greedy(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """peftkit's greedy outputs, one prompt at a time (no padding), and tokens/s including each prefill."""
    start = time.perf_counter()
    outputs = [generate_ids(model, tokenizer, [ids], max_new_tokens=max_new_tokens)[0] for ids in prompts]
    return outputs, sum(map(len, outputs)) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    files, export_s = {}, {}
    for name, export in [
        ("base f32", lambda p: export_gguf("smollm2-135m", p, dtype="f32", overwrite=True)),
        ("merged f32", lambda p: export_gguf(args.adapter, p, dtype="f32", overwrite=True)),
        ("merged q8_0", lambda p: export_gguf(args.adapter, p, dtype="q8_0", overwrite=True)),
        ("lora f32", lambda p: export_lora_gguf(args.adapter, p, dtype="f32", overwrite=True)),
    ]:
        start = time.perf_counter()
        files[name] = export(args.out_dir / (name.replace(" ", "-") + ".gguf")).path
        export_s[name] = time.perf_counter() - start

    loaded = load_artifact(args.adapter, device="cpu", precision="fp32")
    tokenizer, fmt = loaded.tokenizer, loaded.format
    rows = load_task(load_config(None).data, seed=0).test[: args.prompts]
    texts = [format_prompt(tokenizer, fmt, row) for row in rows]
    prompts = [prompt_ids(tokenizer, fmt, text) for text in texts]
    stops = {tokenizer.eos_token_id}

    tuned, tuned_tps = peftkit_greedy(loaded.model, tokenizer, prompts, args.max_new_tokens)
    with loaded.adapted.disable_adapter():
        base, base_tps = peftkit_greedy(loaded.model, tokenizer, prompts, args.max_new_tokens)
    reference, peftkit_tps = {"tuned": tuned, "base": base}, {"tuned": tuned_tps, "base": base_tps}

    results = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
               "load_avg": os.getloadavg()[0], "peftkit_tokens_per_s_incl_prefill": peftkit_tps, "runs": {}}
    for name, model_file, lora_file, compare in [
        ("merged f32", files["merged f32"], None, "tuned"), ("merged q8_0", files["merged q8_0"], None, "tuned"),
        ("base f32 + lora f32", files["base f32"], files["lora f32"], "tuned"), ("base f32", files["base f32"], None, "base"),
    ]:
        llm, load_s = load_gguf(model_file, lora=lora_file, threads=args.threads)
        outputs, speeds = zip(*(greedy(llm, ids, args.max_new_tokens, stops) for ids in prompts))
        same_tokens = [llm.tokenize(t.encode(), add_bos=False, special=True) == ids for t, ids in zip(texts, prompts)]
        size = sum(f.stat().st_size for f in (model_file, lora_file) if f is not None)
        results["runs"][name] = {
            "vs": compare, "size_mib": size / 2**20, "load_s": load_s,
            "decode_tokens_per_s": sum(speeds) / len(speeds), "prompt_tokenized_the_same": sum(same_tokens) / len(texts),
            **agreement(reference[compare], [list(o) for o in outputs]),
            "export_s": export_s.get(name, export_s["base f32"]),
        }
        del llm
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{len(prompts)} aclsum/outcome test prompts, greedy, up to {args.max_new_tokens} new tokens, "
          f"{args.threads} threads, load average {results['load_avg']:.1f}")
    print("| llama.cpp runs | vs peftkit | file MiB | load s | decode tok/s | identical outputs | tokens before 1st difference | prompt tokenized the same |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['vs']} | {r['size_mib']:.0f} | {r['load_s']:.2f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['identical']:.0%} | {r['tokens_before_first_difference']:.0%} | {r['prompt_tokenized_the_same']:.0%} |")
    print(f"peftkit (transformers, fp32) tokens/s incl. prefill: {peftkit_tps}")


if __name__ == "__main__":
    main()
