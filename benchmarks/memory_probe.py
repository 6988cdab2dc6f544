"""Where training memory goes: RSS around each stage of real training steps, beside `peftkit estimate`.

Loads the configured model and method as `peftkit train` does, then for the first N batches of the
run prints the RSS before the step, the bytes autograd keeps (saved-tensor hooks, weights
excluded), and the peak RSS (Linux VmHWM, reset through /proc/self/clear_refs) of the forward, the
backward and the optimizer step. Run it under the heavy-job lock; it takes as long as N steps.

    flock /tmp/peftkit-heavy.lock nice -n 5 .venv/bin/python benchmarks/memory_probe.py method=lora train.max_steps=2
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from peftkit.config import load_config
from peftkit.data.batching import collate
from peftkit.data.datasets import load_tasks
from peftkit.estimate import estimate_memory
from peftkit.models import load_model
from peftkit.train.data import build_train_data, epoch_batches
from peftkit.train.objectives import ObjectiveForward
from peftkit.train.optim import build_optimizer
from peftkit.train.setup import prepare_model
from peftkit.train.tokens import TokenBatches

STATUS = Path("/proc/self/status")


def gib(key: str) -> float:
    return int(re.search(key + r":\s+(\d+) kB", STATUS.read_text()).group(1)) / 2**20


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def kept_bytes(forward: torch.nn.Module, batch: dict, weights: set[int]) -> tuple[torch.Tensor, float]:
    """The step's loss, and the GiB of tensors autograd keeps for backward (weights excluded)."""
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = forward(batch)
    return loss, sum(n for ptr, n in kept.items() if ptr not in weights) / 2**30


def main() -> None:
    cfg = load_config(None, sys.argv[1:])
    estimate = estimate_memory(cfg)
    print("estimate GiB:", {name: round(size / 2**30, 2) for name, size in estimate.rows()}, estimate.batch)
    tasks = load_tasks(cfg.data, cfg.train.seed)
    model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=torch.device("cpu"))
    data = build_train_data(cfg, tasks, tokenizer, False)
    adapted = prepare_model(cfg, model)
    forward = ObjectiveForward(TokenBatches(tokenizer.pad_token_id), adapted)
    optimizer = build_optimizer([p for p in forward.parameters() if p.requires_grad], cfg.train, torch.device("cpu"))
    weights = {p.untyped_storage().data_ptr() for p in adapted.parameters()}
    print(f"runtime + model loaded: RSS {gib('VmRSS'):.2f} GiB")
    for step in range(cfg.train.max_steps or 1):
        ids = epoch_batches(data.lengths, cfg.train.batch_size, cfg.train.seed, 0)[step]
        batch = collate([data.units[i] for i in ids], tokenizer.pad_token_id)
        before = gib("VmRSS")
        reset_peak()
        loss, saved = kept_bytes(forward, batch, weights)
        forward_peak = gib("VmHWM")
        reset_peak()
        loss.backward()
        backward_peak = gib("VmHWM")
        reset_peak()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: batch {tuple(batch['input_ids'].shape)}, RSS before {before:.2f}, kept for backward "
              f"{saved:.2f}, peak forward {forward_peak:.2f} / backward {backward_peak:.2f} / optimizer "
              f"{gib('VmHWM'):.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
