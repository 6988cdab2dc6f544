"""Training speed and memory of the product: `peftkit train` (the CLI) vs HF PEFT + transformers Trainer.

Every system runs as its own process (so its wall time and peak RSS are its own, read with wait4)
over the SAME tokenized examples: the script writes a model folder and jsonl files, tokenizes them
with peftkit's own data code and the config `peftkit train` then reads, and takes the batches in the
order the CLI will train them (`epoch_batches`, seed 0, length-grouped). The training set holds
exactly `steps x batch` examples, so every system trains each of them once, in `steps` optimizer
steps. LoRA (r 8, alpha 16, q_proj + v_proj unless told otherwise, no dropout), AdamW lr 2e-4,
constant schedule, grad-norm clip 1.0, seed 0. Systems:

- `hf`: HF PEFT + Trainer, a collator padding to the longest example, over the CLI's batches in the
  CLI's order (sequential sampler): length-grouped batches, the group_by_length recipe;
- `hf-grouped`: HF PEFT + Trainer with its own `train_sampling_strategy="group_by_length"` sampler
  (the same examples, in the order that sampler picks);
- `hf-flat`: HF PEFT + Trainer with transformers' padding-free `DataCollatorWithFlattening`, over the
  CLI's batches in the CLI's order (one row per batch, position ids restart per example);
- `peftkit`: `peftkit train CONFIG` in a subprocess; `peftkit-qlora`: the same with `method: qlora`.

`--precision` is passed to `peftkit train` as `train.precision`; the reference follows the same
decision (`peftkit.precision.choose_dtype`): in bf16 it loads the base in bf16 and trains with
`bf16=True` (autocast; PEFT keeps the adapter in fp32), which is HF's fastest CPU/CUDA setup.

Reported per system (tokens/s the best of `--repeats` interleaved rounds, memory the highest):
- real tokens/s: non-padding tokens per second of the steps after `--warmup` (the same number of
  steps dropped for every system); peftkit's from its metrics.jsonl (`elapsed_s` per step);
- wall time and peak RSS of the whole process (load, train, validate/held-out loss, save);
- useful model FLOP/s as a fraction of a matmul peak in the chosen dtype, measured just before that
  system's run (a shared machine's load moves both alike)
  (per token: 2 passes (forward, input gradients) x 2 FLOPs x the linear weights, plus causal
  attention over each example; padding and recomputation count for nothing);
- the mean token loss on 32 held-out examples after training (peftkit: its own validation loss).

Workloads:
- `synthetic`: a Llama-shaped model built from its config (hidden 512, 8 layers, vocab 32,000,
  57.7M parameters) with a word-level tokenizer over its ids, random token texts of 64..511 tokens
  (+ EOS), loss on every token;
- `default`: SmolLM2-135M-Instruct on aclsum/outcome rows (cycled to fill the steps), formatted and
  tokenized as the default config does (chat template, `summarize_outcome`, loss on the answer).

    python benchmarks/bench_train.py --workload synthetic --steps 10 --repeats 2
    python benchmarks/bench_train.py --workload default --steps 6 --precision auto --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from peftkit.precision import choose_dtype, cpu_bf16, cpu_flags, dtype_name

SYSTEMS = ("hf", "hf-grouped", "hf-flat", "peftkit")
LABELS = {
    "hf": "HF PEFT + Trainer, padded, length-grouped batches (the CLI's)",
    "hf-grouped": "HF PEFT + Trainer, group_by_length sampler",
    "hf-flat": "HF PEFT + Trainer, DataCollatorWithFlattening",
    "peftkit": "`peftkit train` (CLI)",
    "peftkit-qlora": "`peftkit train`, method qlora (NF4 base)",
}
LR, HELD_OUT, SEED = 2e-4, 32, 0
SYNTHETIC_VOCAB = 32000
FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


# -- workloads ------------------------------------------------------------------------------------
def synthetic_model(folder: Path) -> None:
    """The 57.7M Llama of every synthetic benchmark, random weights (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1344, vocab_size=SYNTHETIC_VOCAB, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)


def synthetic_tokenizer(folder: Path) -> None:
    """A word-level tokenizer whose words are the model's ids ("<pad>", "</s>", "t2" .. "t31999"): texts round-trip."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, SYNTHETIC_VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>").save_pretrained(folder)


def synthetic_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"text": " ".join(f"t{rng.randrange(2, SYNTHETIC_VOCAB)}" for _ in range(rng.randint(64, 511)))}
            for _ in range(count)]


def default_rows(count: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) aclsum/outcome rows: train cycled to `count`, held-out from the validation split."""
    from peftkit.data.sources import aclsum_rows

    train = aclsum_rows("train", "outcome")
    return [train[i % len(train)] for i in range(count)], aclsum_rows("validation", "outcome")[:HELD_OUT]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_config(workload: str, folder: Path, steps: int, batch: int, precision: str, method: str, rank: int,
               targets: str) -> dict:
    """The config `peftkit train` runs (output_dir set per run)."""
    data = {"dataset": None, "train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl"), "test_ratio": 0.0,
            "max_length": 512}
    if workload == "default":
        data.update(prompt="abstract", response="summary", template="summarize_outcome")
    return {
        "model": str(folder / "model"), "method": method, "data": data,
        "lora": {"r": rank, "alpha": 2 * rank, "dropout": 0.0,
                 "target_modules": "all-linear" if targets == "all-linear" else targets.split(",")},
        "train": {"max_steps": steps, "epochs": 1, "batch_size": batch, "lr": LR, "schedule": "constant",
                  "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": SEED, "save_every": 0,
                  "log_every": 1, "precision": precision},
        "generate": {"num_samples": 0},
        "output_dir": str(folder / "run"),
    }


def prepare(args: argparse.Namespace, folder: Path) -> Path:
    """Model folder, jsonl files and config; returns the config path. Writes examples.json (what every system trains)."""
    model_dir = folder / "model"
    count = args.steps * args.batch
    if args.workload == "synthetic":
        synthetic_model(model_dir)
        synthetic_tokenizer(model_dir)
        rows = synthetic_rows(count + HELD_OUT, seed=0)
        train, held = rows[:count], rows[count:]
    else:
        from peftkit.models import load_model

        model, tokenizer = load_model("smollm2-135m")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        train, held = default_rows(count)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "validation.jsonl", held)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(args.workload, folder, args.steps, args.batch, args.precision,
                                                args.method, args.rank, args.targets)))
    tokenize(config, args.batch, folder / "examples.json")
    return config


def tokenize(config: Path, batch: int, out: Path) -> None:
    """The examples exactly as `peftkit train` tokenizes them, its epoch-0 batches, and the held-out set."""
    from transformers import AutoTokenizer

    from peftkit.config import load_config
    from peftkit.data.datasets import load_tasks
    from peftkit.train.data import build_train_data, epoch_batches

    cfg = load_config(config, [])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    data = build_train_data(cfg, load_tasks(cfg.data, cfg.train.seed), tokenizer, seq2seq=False)
    batches = epoch_batches(data.lengths, batch, cfg.train.seed, 0)
    strip = lambda e: {"input_ids": e["input_ids"], "labels": e["labels"]}  # noqa: E731
    out.write_text(json.dumps({
        "batches": [[strip(data.units[i]) for i in ids] for ids in batches],
        "held_out": [strip(e) for e in data.validation],
        "pad_id": tokenizer.pad_token_id,
    }))


# -- measurement ----------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square matmul in `dtype` with this process's threads (the best of `repeats`)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def model_shape(model_dir: Path) -> tuple[int, int, int]:
    """(weights in linear layers, layers, hidden size), from the config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear, config.num_hidden_layers, config.hidden_size


def useful_flops(lengths: list[int], shape: tuple[int, int, int], method: str) -> float:
    """LoRA: forward + input gradients = 2 x (2 N per token + causal attention); full: + weight gradients (2 N)."""
    linear, layers, hidden = shape
    attention = sum(2 * n * n * hidden * layers for n in lengths)  # QK^T and AV, causal half, per pass
    passes = 3 if method == "full" else 2
    return passes * 2 * linear * sum(lengths) + 2 * attention


def run_process(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run `cmd` to completion; (wall seconds, peak RSS GB) of that process alone (wait4)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]}... exited {proc.returncode}; see the tail of {log}:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024**2


def steady(stamps: list[float], lengths: list[list[int]], warmup: int) -> tuple[float, list[int]]:
    """(seconds of the steps after `warmup`, the example lengths those steps trained)."""
    timed = [n for step in lengths[warmup:] for n in step]
    return stamps[len(lengths)] - stamps[warmup], timed


# -- the systems ----------------------------------------------------------------------------------
def run_peftkit(system: str, config: Path, folder: Path, round_: int, env: dict[str, str], decided: str) -> dict:
    """`peftkit train` as users run it; `decided` is the dtype choose_dtype picks, shown if summary.json lacks one."""
    out = folder / f"{system}-{round_}"
    cmd = [str(Path(sys.executable).with_name("peftkit")), "train", str(config), "--set", f"output_dir={out}"]
    if system == "peftkit-qlora":
        cmd += ["--set", "method=qlora"]
    wall, rss = run_process(cmd, folder / f"{system}-{round_}.log", env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "loss" in r]
    batches = json.loads((folder / "examples.json").read_text())["batches"]
    expected = [sum(sum(1 for t in e["labels"][1:] if t != -100) for e in b) for b in batches]  # after the causal shift
    trained = [r["target_tokens"] for r in steps]
    if trained != expected[: len(trained)]:  # the harness must time exactly what the reference trains
        raise RuntimeError(f"peftkit trained other batches than the harness computed: {trained[:4]} vs {expected[:4]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "stamps": [0.0, *[r["elapsed_s"] for r in steps]],
        "lengths": [[len(e["input_ids"]) for e in b] for b in batches[: len(steps)]],
        "losses": [r["loss"] for r in steps], "held_out_loss": [r for r in records if "val_loss" in r][-1]["val_loss"],
        "wall_s": wall, "peak_gb": rss, "dtype": summary.get("precision", {}).get("dtype", decided),
    }


def hf_worker(system: str, folder: Path, warmup: int, precision: str, method: str, rank: int, targets: str,
              out: Path) -> None:
    """One HF PEFT + Trainer run (in its own process): train, held-out loss, save the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    from peftkit.data.batching import collate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, _ = choose_dtype(precision, device, full_finetune=method == "full")
    data = json.loads((folder / "examples.json").read_text())
    batches, pad_id = data["batches"], data["pad_id"]
    train = [e for b in batches for e in b]
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=dtype, attn_implementation="sdpa")
    if method == "lora":
        target = "all-linear" if targets == "all-linear" else targets.split(",")
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target, lora_dropout=0.0))
    lengths: list[list[int]] = []
    flatten = DataCollatorWithFlattening(return_position_ids=True)

    def collator(rows: list[dict]) -> dict:
        lengths.append([len(r["input_ids"]) for r in rows])
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        return flatten(rows) if system == "hf-flat" else collate(rows, pad_id)

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

    grouped = system == "hf-grouped"  # LengthGroupedSampler reads each row's input_ids length
    args = TrainingArguments(
        output_dir=str(folder / f"{system}-trainer"), per_device_train_batch_size=len(batches[0]),
        max_steps=len(batches), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=device.type == "cpu", seed=SEED,
        dataloader_num_workers=0, remove_unused_columns=False, optim="adamw_torch", max_grad_norm=1.0,
        train_sampling_strategy="group_by_length" if grouped else "sequential",
        bf16=dtype == torch.bfloat16, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        held = held_out_loss(model, data["held_out"], pad_id, device)
    trainer.save_model(str(folder / f"{system}-adapter"))
    out.write_text(json.dumps({"stamps": [start, *stamps], "lengths": lengths[: len(stamps)], "losses": losses,
                               "held_out_loss": held, "dtype": dtype_name(dtype)}))


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, examples: list[dict], pad_id: int, device: torch.device) -> float:
    """Mean loss per target token, shortest examples batched together (as peftkit's validation does)."""
    from peftkit.data.batching import collate

    model.eval()
    order = sorted(examples, key=lambda e: len(e["input_ids"]))
    total, count = 0.0, 0
    for start in range(0, len(order), 8):
        batch = {k: v.to(device) for k, v in collate(order[start : start + 8], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def run_hf(system: str, args: argparse.Namespace, folder: Path, round_: int, env: dict[str, str]) -> dict:
    out = folder / f"{system}-{round_}.json"
    cmd = [sys.executable, __file__, "--worker", system, "--folder", str(folder), "--warmup", str(args.warmup),
           "--precision", args.precision, "--method", args.method, "--rank", str(args.rank), "--targets", args.targets,
           "--out", str(out)]
    wall, rss = run_process(cmd, folder / f"{system}-{round_}.log", env)
    result = json.loads(out.read_text())
    start = result["stamps"][0]
    return {**result, "stamps": [s - start for s in result["stamps"]], "wall_s": wall, "peak_gb": rss}


def measure(system: str, args: argparse.Namespace, config: Path, folder: Path, round_: int,
            shape: tuple[int, int, int], env: dict[str, str]) -> dict:
    run = (run_peftkit(system, config, folder, round_, env, args.dtype) if system.startswith("peftkit")
           else run_hf(system, args, folder, round_, env))
    seconds, timed = steady(run["stamps"], run["lengths"], args.warmup)
    tokens = sum(timed)
    return {
        "system": system, "steps": len(run["lengths"]), "tokens_per_s": tokens / seconds, "timed_tokens": tokens,
        "flops_per_s": useful_flops(timed, shape, args.method) / seconds, "wall_s": run["wall_s"],
        "peak_gb": run["peak_gb"], "held_out_loss": run["held_out_loss"], "first_loss": run["losses"][0],
        "last_loss": run["losses"][-1], "dtype": run["dtype"],
    }


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
    flags = [f for f in FLAGS_SHOWN if f in cpu_flags()]
    return (f"{name}, {os.cpu_count()} cores, CPU flags {' '.join(flags) or 'unknown'} "
            f"(native bf16: {cpu_bf16()[1]}), torch {torch.__version__}")


def best_of(rounds: list[dict]) -> dict:
    """The fastest round's figures (wall time included), with the highest peak memory of all rounds."""
    best = dict(max(rounds, key=lambda r: r["tokens_per_s"]))
    best["peak_gb"] = max(r["peak_gb"] for r in rounds)
    best["rounds"] = len(rounds)
    return best


def table(args: argparse.Namespace, results: list[dict], dtype: torch.dtype, why: str, command: str,
          load: tuple[float, float]) -> str:
    ref = max((r for r in results if not r["system"].startswith("peftkit")), key=lambda r: r["tokens_per_s"],
              default=results[0])
    lines = [
        f"### {args.workload} workload, {args.method}, precision {args.precision} ({dtype_name(dtype)}: {why})", "",
        (f"`{command}` — {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 1-minute load average "
         f"{load[0]:.1f} at the start, {load[1]:.1f} at the end; matmul peak measured before each run "
         f"{min(r['peak'] for r in results) / 1e9:.1f}..{max(r['peak'] for r in results) / 1e9:.1f} GFLOP/s "
         f"({dtype_name(dtype)}, 2048², {torch.get_num_threads()} threads). Ratios are against the fastest reference "
         f"row ({LABELS[ref['system']]}); tokens/s and wall time are the fastest of {ref.get('rounds', 1)} "
         f"interleaved round(s), memory the highest."), "",
        "| system | dtype | steps | real tokens/s | x ref | wall (s) | x ref | peak RSS (GB) | x ref | FLOP/s of peak "
        "| held-out loss | first -> last train loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        label = LABELS[r["system"]]
        if args.method == "full":  # no adapter on either side
            label = label.replace("HF PEFT + Trainer", "HF Trainer")
        lines.append(
            f"| {label} | {r['dtype']} | {r['steps']} | {r['tokens_per_s']:.0f} "
            f"| {r['tokens_per_s'] / ref['tokens_per_s']:.2f} | {r['wall_s']:.0f} | {r['wall_s'] / ref['wall_s']:.2f} "
            f"| {r['peak_gb']:.2f} | {r['peak_gb'] / ref['peak_gb']:.2f} | {100 * r['flops_per_s'] / r['peak']:.1f}% "
            f"| {r['held_out_loss']:.4f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["synthetic", "default"], default="synthetic")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                        help="peftkit's train.precision; the reference follows the same decision")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (the training set is steps x batch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s, for every system")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(LABELS)}")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated, or all-linear")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the systems; tokens/s is the best round")
    parser.add_argument("--results", type=Path, help="append the table to this markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        hf_worker(args.worker, args.folder, args.warmup, args.precision, args.method, args.rank, args.targets, args.out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, why = choose_dtype(args.precision, device, full_finetune=args.method == "full")
    args.dtype = dtype_name(dtype)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = prepare(args, folder)
        shape = model_shape(folder / "model")
        runs: dict[str, list[dict]] = {system: [] for system in args.systems.split(",")}
        for round_ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every system alike
            for system, done in runs.items():
                peak = matmul_peak(dtype)
                r = {**measure(system, args, config, folder, round_, shape, env), "peak": peak}
                done.append(r)
                print(f"{system} (round {round_ + 1}): {r['tokens_per_s']:.0f} tok/s, wall {r['wall_s']:.0f} s, "
                      f"peak {r['peak_gb']:.2f} GB, matmul peak {peak / 1e9:.1f} GFLOP/s, held-out loss {r['held_out_loss']:.4f}", flush=True)
            results = [best_of(rounds) for rounds in runs.values()]
            report = table(args, results, dtype, why, command, (load_start, os.getloadavg()[0]))
            print(f"after round {round_ + 1} of {args.repeats}:\n{report}", flush=True)  # a cut-short run still has a table
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
