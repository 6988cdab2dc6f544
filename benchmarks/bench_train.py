"""Training speed and memory: HF PEFT + transformers Trainer vs peftkit, same model, data, steps, seed.

Every system runs in its own subprocess (so its peak RSS is its own) over the SAME tokenized
examples, the same number of optimizer steps and the same LoRA (r 8, alpha 16, q_proj + v_proj, no
dropout, AdamW lr 2e-4, constant schedule, fp32 here). Reported per system:

- real tokens/s: non-padding input tokens per second of training, after `--warmup` steps (both
  systems pay their start-up, compile or allocator warm-up in those steps);
- peak RSS of the process (peak CUDA memory on a GPU);
- achieved model FLOP/s as a fraction of a matmul peak this script measures itself
  (useful FLOPs per token: 2 passes (forward, input gradients) x 2 FLOPs x the linear weights,
  plus causal attention; padding and recomputation count for nothing);
- the mean token loss on 32 held-out examples after training, computed the same way for both.

Workloads:
- `synthetic`: a Llama-shaped model built from its config (hidden 512, 8 layers, vocab 32,000,
  57.7M parameters), random tokens, lengths uniform in 64..512, batch 8, loss on every token;
- `default`: SmolLM2-135M on aclsum/outcome as `peftkit train` tokenizes it (loss on the answer).

    python benchmarks/bench_train.py --workload synthetic --steps 24
    python benchmarks/bench_train.py --workload default --steps 12 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SYSTEMS = ("hf", "hf-grouped", "peftkit")
LABELS = {
    "hf": "HF PEFT + Trainer (pad to longest)",
    "hf-grouped": "HF PEFT + Trainer, group_by_length",
    "peftkit": "peftkit (padding-free rows, fused LoRA, fused linear cross-entropy)",
    "peftkit-qlora": "peftkit QLoRA (NF4 base, double quant)",
}
METHOD = "lora"  # --method full: every weight trains (HF: Trainer without PEFT; peftkit: method full)
LR, RANK, ALPHA, TARGETS = 2e-4, 8, 16, ["q_proj", "v_proj"]
HELD_OUT = 32


# -- workloads ------------------------------------------------------------------------------------
def synthetic_model(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1344, vocab_size=32000, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)


def synthetic_examples(count: int, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = [rng.randrange(32000) for _ in range(rng.randint(64, 512))]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def default_examples(count: int, model_dir: Path) -> list[dict[str, list[int]]]:
    """aclsum/outcome tokenized exactly as `peftkit train` does with configs/default.yaml."""
    from transformers import AutoTokenizer

    from peftkit.config import load_config
    from peftkit.data.datasets import load_tasks
    from peftkit.train.data import build_train_data

    cfg = load_config(Path(__file__).parent.parent / "configs" / "default.yaml", [])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = build_train_data(cfg, load_tasks(cfg.data, 0), tokenizer, seq2seq=False)
    rows = [{"input_ids": u["input_ids"], "labels": u["labels"]} for u in data.units]
    rows += [{"input_ids": u["input_ids"], "labels": u["labels"]} for u in data.validation]
    return [rows[i % len(rows)] for i in range(count)]


def prepare(workload: str, steps: int, batch: int, folder: Path) -> tuple[Path, int]:
    """The model folder and the examples file (train + held-out) both systems read."""
    if workload == "synthetic":
        model_dir = folder / "model"
        synthetic_model(model_dir)
        examples = synthetic_examples(steps * batch + HELD_OUT, seed=0)
        pad_id = 0
    else:
        from peftkit.models import load_model

        model, tokenizer = load_model("smollm2-135m")
        model_dir = folder / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        examples = default_examples(steps * batch + HELD_OUT, model_dir)
        pad_id = tokenizer.pad_token_id
        del model
    (folder / "examples.json").write_text(json.dumps(examples))
    return model_dir, pad_id


# -- shared measurement ---------------------------------------------------------------------------
def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square fp32 matmul with this process's threads (the best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def linear_params(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def useful_flops(lengths: list[int], linear: int, layers: int, hidden: int) -> float:
    """LoRA: forward + input gradients = 2 x (2 N per token + causal attention); full: + weight gradients (2 N)."""
    tokens = sum(lengths)
    attention = sum(2 * n * n * hidden * layers for n in lengths)  # QK^T and AV, causal half, per pass
    passes = 3 if METHOD == "full" else 2
    return passes * 2 * linear * tokens + 2 * attention


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, examples: list[dict], pad_id: int) -> float:
    from peftkit.data.batching import collate

    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 8):
        batch = collate(examples[start : start + 8], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# -- the systems ----------------------------------------------------------------------------------
def run_hf(model_dir: Path, train: list[dict], pad_id: int, steps: int, batch: int, grouped: bool,
           device: torch.device) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from peftkit.data.batching import collate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if METHOD == "lora":
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    seen: list[int] = []

    def collator(rows: list[dict]) -> dict:
        out = collate(rows, pad_id)
        seen.append(int(out["attention_mask"].sum()))
        return out

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i: int) -> dict:
            return train[i]

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=device.type == "cpu", seed=0, dataloader_num_workers=0, remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if grouped else "random", length_column_name="length", optim="adamw_torch", max_grad_norm=1.0,
        disable_tqdm=True,
    )
    if grouped:
        for row in train:
            row["length"] = len(row["input_ids"])
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    base = model.base_model.model if METHOD == "lora" else model
    return {"stamps": [start, *stamps], "tokens": seen[: len(stamps)], "losses": losses, "model": base}


def run_peftkit(model_dir: Path, train: list[dict], pad_id: int, steps: int, batch: int,
                device: torch.device, quantized: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import AdaptedModel
    from peftkit.config import LoraConfig, TrainConfig
    from peftkit.train.attention import enable_padding_free
    from peftkit.train.loop import clip_gradients
    from peftkit.train.loss import LossForward
    from peftkit.train.optim import build_optimizer
    from peftkit.train.step import accumulate_gradients

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    adapted = AdaptedModel(model)
    if quantized:
        from peftkit.config import QuantConfig
        from peftkit.methods.quant import quantize_base

        quantize_base(model, QuantConfig(), device)
    if METHOD == "full":
        model.requires_grad_(True)
    else:
        adapted.add_adapter("default", LoraConfig(r=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS))
    forward = LossForward(adapted).train()
    params = [p for p in forward.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, TrainConfig(lr=LR, weight_decay=0.0), device)
    flat = enable_padding_free(model)
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    stamps, tokens, losses = [time.perf_counter()], [], []
    for step in range(steps):  # the same examples, `batch` per optimizer step, as one padding-free row
        chunk = [train[i] for i in order[step * batch : (step + 1) * batch]]
        if not chunk:
            break
        result = accumulate_gradients(forward, chunk, None, pad_id, device=device, flat=flat)
        clip_gradients(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        tokens.append(result.tokens)
        losses.append(result.loss)
    return {"stamps": stamps, "tokens": tokens, "losses": losses, "model": model}


def worker(system: str, folder: Path, steps: int, batch: int, warmup: int, pad_id: int, result_file: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples = json.loads((folder / "examples.json").read_text())
    train, held = examples[:-HELD_OUT], examples[-HELD_OUT:]
    model_dir = folder / "model"
    if system.startswith("peftkit"):
        run = run_peftkit(model_dir, train, pad_id, steps, batch, device, quantized=system == "peftkit-qlora")
    else:
        run = run_hf(model_dir, train, pad_id, steps, batch, system == "hf-grouped", device)
    stamps, tokens = run["stamps"], run["tokens"]
    timed = slice(warmup, len(tokens))
    seconds = stamps[len(tokens)] - stamps[warmup]
    timed_tokens = sum(tokens[timed])
    peak = peak_memory_gb(device)
    model = run["model"]
    cfg = model.config
    lengths_timed = [len(r["input_ids"]) for r in train]  # every system trains on exactly these examples
    flops_per_token = useful_flops(lengths_timed, linear_params(model), cfg.num_hidden_layers, cfg.hidden_size) / sum(lengths_timed)
    result = {
        "system": system, "steps": len(tokens), "tokens_per_s": timed_tokens / seconds, "seconds": seconds,
        "timed_tokens": timed_tokens, "total_s": stamps[-1] - stamps[0], "peak_gb": peak,
        "flops_per_s": flops_per_token * timed_tokens / seconds, "first_loss": run["losses"][0],
        "last_loss": run["losses"][-1], "held_out_loss": held_out_loss(model, held, pad_id),
        "device": str(device), "threads": torch.get_num_threads(),
    }
    result_file.write_text(json.dumps(result))


# -- the report -----------------------------------------------------------------------------------
def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def best_of(rounds: list[dict]) -> dict:
    """The fastest round's figures, with the highest peak memory of all rounds (the conservative one)."""
    best = dict(max(rounds, key=lambda r: r["tokens_per_s"]))
    best["peak_gb"] = max(r["peak_gb"] for r in rounds)
    best["rounds"] = len(rounds)
    return best


def table(workload: str, results: list[dict], peak: float, command: str) -> str:
    ref = max((r for r in results if not r["system"].startswith("peftkit")), key=lambda r: r["tokens_per_s"])
    lines = [
        f"### {workload} workload, {METHOD}", "",
        (f"`{command}` — {machine()}, {time.strftime('%Y-%m-%d')}; matmul peak measured {peak / 1e9:.1f} GFLOP/s (fp32, "
        f"{torch.get_num_threads()} threads). Ratios are against the best reference row ({LABELS[ref['system']]}); "
        f"tokens/s is the best of {ref.get('rounds', 1)} interleaved round(s), memory the highest of them."), "",
        "| system | steps | real tokens/s | x ref | peak memory (GB) | x ref | FLOP/s of peak | held-out loss | first -> last train loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        label = LABELS[r["system"]]
        if METHOD == "full":  # no adapter on either side
            label = label.replace("HF PEFT + Trainer", "HF Trainer").replace("fused LoRA, ", "")
        lines.append(
            f"| {label} | {r['steps']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f} "
            f"| {r['peak_gb']:.2f} | {r['peak_gb'] / ref['peak_gb']:.2f} | {100 * r['flops_per_s'] / peak:.1f}% "
            f"| {r['held_out_loss']:.4f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["synthetic", "default"], default="synthetic")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(LABELS)}")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the systems; tokens/s is the best round")
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pad-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global METHOD
    METHOD = args.method
    if args.worker:
        worker(args.worker, args.folder, args.steps, args.batch, args.warmup, args.pad_id, args.out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, pad_id = prepare(args.workload, args.steps, args.batch, folder)
        peak = matmul_peak()
        runs: dict[str, list[dict]] = {system: [] for system in args.systems.split(",")}
        for round_ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every system alike
            for system, done in runs.items():
                out = folder / f"{system}-{round_}.json"
                cmd = [sys.executable, __file__, "--worker", system, "--method", args.method, "--folder", str(folder),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--warmup", str(args.warmup),
                       "--pad-id", str(pad_id), "--out", str(out)]
                subprocess.run(cmd, check=True)
                r = json.loads(out.read_text())
                done.append(r)
                print(f"{system} (round {round_ + 1}): {r['tokens_per_s']:.0f} tok/s, peak {r['peak_gb']:.2f} GB, "
                      f"held-out loss {r['held_out_loss']:.4f}", flush=True)
        results = [best_of(rounds) for rounds in runs.values()]
    report = table(args.workload, results, peak, command)
    print(report)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
