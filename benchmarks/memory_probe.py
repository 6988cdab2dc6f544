"""Where training memory goes: RSS around each stage of real training steps, beside `peftkit estimate`,
and a tally of what autograd keeps for backward, per module and dtype.

Loads the configured model and method as `peftkit train` does (the dtype of `train.precision`),
builds each step's batch as the loop does (one padding-free row where the model allows it), then
for the first N batches prints the RSS before the step, the bytes autograd keeps (saved-tensor
hooks, weights excluded), and the peak RSS (Linux VmHWM, reset through /proc/self/clear_refs) of
the forward, the backward and the optimizer step. `--tally` adds one table per step: the kept
bytes by module (layer numbers folded into `*`, so a row is summed over every layer) and dtype, and
per token. `--layers N` keeps the first N decoder layers only: what one layer keeps does not depend
on the depth, and a bf16 step on a CPU without native bf16 is slow. `--longest` probes the batches
with the most tokens first (the run's peak), not the first ones. `--mmap-threshold 65536` fixes
glibc's mmap threshold in-process (as `MALLOC_MMAP_THRESHOLD_=65536` does from the environment):
glibc otherwise raises it after the first large frees and keeps later activations in its heap.

    flock /tmp/peftkit-heavy.lock nice -n 5 .venv/bin/python benchmarks/memory_probe.py method=lora train.max_steps=2
    PEFTKIT_CPU_BF16=1 .venv/bin/python benchmarks/memory_probe.py --tally --longest --layers 2 \\
        lora.target_modules=all-linear train.precision=auto train.max_steps=1
"""

from __future__ import annotations

import argparse
import ctypes
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftkit.config import PACKABLE_METHODS, load_config
from peftkit.data.batching import collate
from peftkit.data.datasets import load_tasks
from peftkit.estimate import estimate_memory
from peftkit.models import load_model
from peftkit.precision import choose_dtype, dtype_name
from peftkit.train.attention import enable_padding_free, flat_example
from peftkit.train.data import build_train_data, epoch_batches
from peftkit.train.loss import LossForward
from peftkit.train.optim import build_optimizer
from peftkit.train.setup import prepare_model

STATUS = Path("/proc/self/status")
M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter: allocations at least this large are mmapped and returned to the OS when freed."""
Kept = dict[int, tuple[str, str, int]]
"""storage pointer -> (module pattern, dtype, bytes)."""


def gib(key: str) -> float:
    return int(re.search(key + r":\s+(\d+) kB", STATUS.read_text()).group(1)) / 2**20


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def module_stack_hooks(root: nn.Module, stack: list[str]) -> list[Any]:
    """Hooks keeping `stack[-1]` = the module whose forward is running (layer numbers folded to `*`)."""
    def enter(pattern: str) -> Callable[..., None]:
        return lambda _module, _args: stack.append(pattern)  # list.append returns None: inputs unchanged

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:  # a returned value would replace the output
        stack.pop()

    handles = []
    for name, module in root.named_modules():
        handles.append(module.register_forward_pre_hook(enter(re.sub(r"\.\d+(?=\.|$)", ".*", name) or "(loss forward)")))
        handles.append(module.register_forward_hook(leave))
    return handles


def kept_tensors(forward: nn.Module, batch: dict, weights: set[int]) -> tuple[torch.Tensor, Kept]:
    """The step's loss, and every storage autograd keeps for backward (weights excluded), by the module that saved it."""
    kept: Kept = {}
    stack = ["(outside modules)"]
    handles = module_stack_hooks(forward, stack)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in weights and ptr not in kept:
            kept[ptr] = (stack[-1], dtype_name(tensor.dtype), storage.nbytes())
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    return loss, kept


def tally(kept: Kept, tokens: int) -> str:
    """Kept bytes by (module pattern, dtype), largest first, with bytes per token."""
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for pattern, dtype, size in kept.values():
        sums[(pattern, dtype)] += size
    total = sum(sums.values())
    lines = [f"  {'module (summed over layers)':58} {'dtype':>5} {'MiB':>9} {'B/token':>9} {'share':>6}"]
    for (pattern, dtype), size in sorted(sums.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {pattern[-58:]:58} {dtype:>5} {size / 2**20:9.1f} {size / tokens:9.0f} {100 * size / total:5.1f}%")
    lines.append(f"  {'total':58} {'':>5} {total / 2**20:9.1f} {total / tokens:9.0f}")
    return "\n".join(lines)


def keep_layers(model: nn.Module, count: int) -> None:
    """Drop every decoder layer after the first `count` (shapes per layer unchanged)."""
    body = model.get_decoder()
    body.layers = body.layers[:count]
    model.config.num_hidden_layers = count


def step_order(lengths: list[int], batch_size: int, seed: int, longest: bool) -> list[list[int]]:
    batches = epoch_batches(lengths, batch_size, seed, 0)
    return sorted(batches, key=lambda ids: -sum(lengths[i] for i in ids)) if longest else batches


def make_batch(examples: list[dict], pad_id: int, flat: bool) -> dict:
    """What the loop's step feeds the model: one padding-free row, or a padded batch."""
    return collate([flat_example(examples)], pad_id) if flat else collate(examples, pad_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, as `peftkit train --set` takes them")
    parser.add_argument("--tally", action="store_true", help="kept bytes per module and dtype")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    parser.add_argument("--longest", action="store_true", help="probe the batches with the most tokens first")
    parser.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                        help="glibc mallopt(M_MMAP_THRESHOLD): a fixed threshold, so freed activations leave the process")
    args = parser.parse_args()
    if args.mmap_threshold:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, args.mmap_threshold)
    cfg = load_config(None, args.overrides)
    estimate = estimate_memory(cfg)
    print("estimate GiB:", {name: round(size / 2**30, 2) for name, size in estimate.rows()}, estimate.batch)
    device = torch.device("cpu")
    dtype, why = choose_dtype(cfg.train.precision, device, full_finetune=cfg.method == "full")
    tasks = load_tasks(cfg.data, cfg.train.seed)
    model, tokenizer = load_model(cfg.model, dtype=dtype, device=device)
    if args.layers:
        keep_layers(model, args.layers)
    data = build_train_data(cfg, tasks, tokenizer, False)
    adapted = prepare_model(cfg, model)
    flat = cfg.train.padding_free and cfg.method in PACKABLE_METHODS and enable_padding_free(model)
    forward = LossForward(adapted).train()
    optimizer = build_optimizer([p for p in forward.parameters() if p.requires_grad], cfg.train, device)
    weights = {p.untyped_storage().data_ptr() for p in adapted.parameters()}
    layers = model.config.num_hidden_layers
    print(f"{dtype_name(dtype)} ({why}); {layers} decoder layers; padding-free rows: {bool(flat)}; "
          f"runtime + model loaded: RSS {gib('VmRSS'):.2f} GiB")
    for step, ids in enumerate(step_order(data.lengths, cfg.train.batch_size, cfg.train.seed, args.longest)[: cfg.train.max_steps or 1]):
        batch = make_batch([data.units[i] for i in ids], tokenizer.pad_token_id, flat)
        tokens = int(batch["attention_mask"].sum())
        before = gib("VmRSS")
        reset_peak()
        loss, kept = kept_tensors(forward, batch, weights)
        forward_peak = gib("VmHWM")
        saved = sum(size for _, _, size in kept.values()) / 2**30
        reset_peak()
        loss.backward()
        backward_peak = gib("VmHWM")
        reset_peak()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: batch {len(ids)} examples, {tokens} tokens, input {tuple(batch['input_ids'].shape)}, "
              f"RSS before {before:.2f}, kept for backward {saved:.2f}, peak forward {forward_peak:.2f} / backward "
              f"{backward_peak:.2f} / optimizer {gib('VmHWM'):.2f} GiB", flush=True)
        if args.tally:
            print(tally(kept, tokens), flush=True)


if __name__ == "__main__":
    main()
