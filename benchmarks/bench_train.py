"""Training speed and memory, side by side in one invocation: HF PEFT + transformers Trainer vs peftkit.

Each stack runs in its own subprocess (so peak RSS is its own), on the same model, data, batch,
steps and seed, and reports real target tokens/s (labelled, non-padding tokens), peak RSS,
achieved FLOP/s as a fraction of a matmul peak measured here, and its final loss.

    python benchmarks/bench_train.py --workload synthetic --steps 8
    python benchmarks/bench_train.py --workload default --steps 8
    python benchmarks/bench_train.py --workload default --steps 8 --method full

Workloads:
- synthetic: a Llama-shaped 57.7M model (hidden 512, 8 layers, vocab 32,000) from its config,
  random token sequences with lengths uniform in 64-512, loss on every token, LoRA r8 on q,v.
- default: SmolLM2-135M on aclsum outcome (loss on the summary only), LoRA r8 on q,v.
"""

from __future__ import annotations

import argparse
import json
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

HERE = Path(__file__).resolve().parent
BATCH = 8


# ----------------------------------------------------------------------------------------------
# shared setup
def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Achieved FLOP/s of an n x n matmul on this machine (the best of `reps`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def synthetic_model_dir(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    folder = root / "synthetic-llama"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(32000)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  eos_token="t2", pad_token="t2", bos_token="t1")
    tok.save_pretrained(folder)
    return folder


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(3, 32000) for _ in range(rng.randint(64, 512))]} for _ in range(n)]


def default_examples(tokenizer, method_full: bool = False) -> list[dict]:
    """aclsum outcome tokenized by peftkit's own formatting (the reference gets identical ids)."""
    from peftkit.config import load_config
    from peftkit.data import load_task, tokenize_task_rows

    cfg = load_config(None)
    task = load_task(cfg.data, 0)
    examples, _ = tokenize_task_rows(task.train, tokenizer, task, 512, seed=0)
    return examples


# ----------------------------------------------------------------------------------------------
# the reference: HF PEFT + transformers Trainer
def run_reference(args: argparse.Namespace, model_path: str, rows: list[dict]) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, TrainerCallback

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if args.method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    pad = 2

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), 1
            labels[i, :n] = torch.tensor(r.get("labels", r["input_ids"]))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    counted = {"targets": 0, "real": 0, "padded": 0}
    original_collate = collate

    def counting_collate(batch):
        out = original_collate(batch)
        counted["targets"] += int((out["labels"][:, 1:] != -100).sum())
        counted["real"] += int(out["attention_mask"].sum())
        counted["padded"] += out["input_ids"].numel()
        return out

    losses = []

    class Losses(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=args.steps, learning_rate=args.lr,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=not torch.cuda.is_available(),
        group_by_length=True, length_column_name="length", remove_unused_columns=False, dataloader_num_workers=0,
        bf16=args.bf16, warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=1.0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=Rows(), data_collator=counting_collate, callbacks=[Losses()])
    trainer._get_train_sampler = _length_sampler(trainer, rows)  # group_by_length on a plain dataset
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "losses": losses, **counted}


def _length_sampler(trainer, rows):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    def sampler(*a, **k):
        return LengthGroupedSampler(BATCH, lengths=[len(r["input_ids"]) for r in rows], generator=torch.Generator().manual_seed(0))

    return sampler


# ----------------------------------------------------------------------------------------------
# peftkit
def run_peftkit(args: argparse.Namespace, model_path: str, data_file: Path) -> dict:
    from peftkit.config import config_from_dict
    from peftkit.train import run_training

    out = Path(tempfile.mkdtemp())
    raw = {
        "model": model_path, "method": args.method,
        "data": {"dataset": None, "train": str(data_file), "val_ratio": 0.0, "test_ratio": 0.0, "max_length": 512,
                 "packing": args.packing},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": args.steps, "batch_size": BATCH, "lr": args.lr, "seed": 0, "save_every": 0,
                  "warmup_ratio": 0.0, "schedule": "constant", "precision": "bf16" if args.bf16 else "fp32"},
        "generate": {"num_samples": 0}, "output_dir": str(out / "run"),
    }
    cfg = config_from_dict(raw)
    result = run_training(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "run/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"seconds": result.train_seconds if hasattr(result, "train_seconds") else result.seconds,
            "losses": losses, "targets": result.target_tokens if hasattr(result, "target_tokens") else None,
            "real": result.train_tokens}


# ----------------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    root = Path(args.cache)
    if args.workload == "synthetic":
        model_path = str(synthetic_model_dir(root))
        rows = synthetic_rows(BATCH * args.steps)
    else:
        from peftkit.models import load_tokenizer, resolve_model_path

        model_path = resolve_model_path("smollm2-135m")
        rows = default_examples(load_tokenizer(model_path))
    data_file = root / f"{args.workload}.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_reference(args, model_path, rows) if args.stack == "reference" else run_peftkit(args, model_path, data_file)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    n_params = sum(1 for _ in ())  # filled by the parent from the model config
    del n_params
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["synthetic", "default"], default="synthetic")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--bf16", action="store_true", help="bf16 for both stacks (only where the CPU has native bf16)")
    parser.add_argument("--packing", action="store_true", help="peftkit packs examples (the reference pads)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stack", choices=["reference", "peftkit"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "peftkit-bench"))
    args = parser.parse_args()
    if args.stack:
        child(args)
        return
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    results = {}
    for stack in ("reference", "peftkit"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--stack", stack]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{stack} failed:\n{proc.stderr[-4000:]}")
        results[stack] = json.loads(line[7:])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
