"""Training memory before training: weights, gradients, optimizer states and activations, per method.

Parameter counts are exact: the model is built on the `meta` device (no memory) and the method is
attached to it for real. Activations follow what autograd keeps per token and layer (in floats):

    frozen base (LoRA, DoRA, QLoRA):  6 h + 3 i  (+ h per adapted input with dropout, + 2 out per DoRA layer)
    trained base (full, selective):  10 h + 4 i  (every linear layer's input is kept for its weight gradient)

where h is the hidden size and i the MLP width; blocks below the lowest trained tensor keep
nothing, and a trained tensor at the input (soft prompt, prefix, embeddings) makes every block keep
the frozen path. The loss keeps the logits of the target positions, and their gradient, in fp32.
On top, malloc keeps freed temporaries between the kept tensors (`ALLOCATOR_SHARE`). The
coefficients were read off `torch.autograd.graph.saved_tensors_hooks` on Llama-style models
(tests/test_estimate.py measures them again). The batch shapes are the run's own: the config's
data is tokenized and each step's batch taken in the training order, so the estimate is the peak
of the steps the run will take (one unpadded row per forward where the run is padding-free).

Preference objectives (`objective: dpo | orpo`) run both answers of every pair in one forward: twice
the rows, so about twice the activations of an SFT step of as many examples. DPO's reference costs no
second copy of the model, for full fine-tuning too: its log-probabilities are computed once, without
gradients, and cached per pair (train/preference.py), so weights, gradients and optimizer are unchanged.

Example:
    >>> est = estimate_memory(load_config(None, ["method=full"]))
    >>> est.total / 2**30, est.state_vs_weights
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .adapters import AdaptedModel, adapter_containers
from .architectures import architecture_of
from .config import RunConfig
from .data.datasets import load_tasks
from .methods.lora import LoraLinear
from .methods.quant import QuantConfig, quantizable_paths
from .methods.registry import get_method
from .methods.selective import block_position
from .models import load_tokenizer, resolve_device, resolve_model_path
from .precision import choose_dtype
from .train.data import build_train_data, epoch_batches
from .train.optim import effective_optimizer
from .train.preference import run_micro_batches as preference_micro_batches
from .train.setup import ADAPTER_NAME

RUNTIME_BYTES = 450 * 2**20
"""Python with torch, transformers, the tokenizer and the data loaded (measured on CPU: ~0.45 GB RSS)."""
ALLOCATOR_SHARE = 0.3
"""Process memory beyond the kept activations, as a share of them: temporaries freed during the
forward stay in malloc's heaps between the kept tensors. The gradients, allocated in backward as
activations are freed, reuse that space first. Fitted on the default model (CPU, glibc malloc):
LoRA 0.36, full fine-tuning 0.22 (docs/methods.md, "Memory")."""
ADAM_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0 + 8 / 256}  # two states per parameter (8-bit: + block scales)


@dataclass(frozen=True)
class BatchShape:
    """One optimizer step's forward: rows, padded length, and target (loss) positions."""

    rows: int
    length: int
    targets: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of training memory, and what they were computed from."""

    method: str
    trainable_params: int
    total_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    allocator: int
    runtime: int
    batch: BatchShape

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.allocator + self.runtime

    @property
    def weights_16bit(self) -> int:
        """The base model's weights stored in 16 bits: the yardstick of "full fine-tuning needs 12-20x"."""
        return 2 * self.total_params

    @property
    def state_vs_weights(self) -> float:
        """(weights + gradients + optimizer + activations) as a multiple of the 16-bit weights."""
        return (self.weights + self.gradients + self.optimizer + self.activations) / self.weights_16bit

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
                ("activations", self.activations), ("allocator slack (freed temporaries)", self.allocator),
                ("runtime (python, torch, data)", self.runtime)]


# -- parameters -----------------------------------------------------------------------------------


def meta_model(cfg: RunConfig) -> nn.Module:
    """The configured model with its method attached, on the meta device (shapes only, no memory)."""
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model))
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    method = get_method(cfg.method)
    with torch.device("meta"):
        model = cls.from_config(config)
        adapted = AdaptedModel(model)
        if method.section is None:  # full fine-tuning: every weight trains
            method.prepare_base(model, cfg)  # type: ignore[misc]
        else:  # a quantized base is counted from the quant config (quantized_bytes), not built on meta
            adapted.add_adapter(ADAPTER_NAME, getattr(cfg, method.section))
    return adapted


def quantized_bytes(numel: int, out_features: int, quant: QuantConfig) -> float:
    """Storage of one linear layer's weight in bitsandbytes 4-bit (blocks of 64) or 8-bit (row scales)."""
    if quant.bits == 8:
        return numel + 4 * out_features
    blocks = math.ceil(numel / 64)
    code = 4 * 16  # the 16 NF4/FP4 levels
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 if quant.double_quant else 4 * blocks  # 8-bit scales + their fp32 scales
    return numel / 2 + scales + code


def quantizes_base(cfg: RunConfig) -> bool:
    """Does the run's method store the frozen base quantized? (the one whose registry entry declares `quant:`)"""
    return "quant" in get_method(cfg.method).sections


def weight_bytes(adapted: nn.Module, cfg: RunConfig, dtype_bytes: int) -> float:
    """Frozen base in the run's dtype (quantized layers as bitsandbytes stores them); trained tensors in fp32."""
    quantized = set(quantizable_paths(adapted.model, cfg.quant)) if quantizes_base(cfg) else set()
    total, seen = 0.0, set()
    for path, module in adapted.model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied embeddings and head are one tensor
                continue
            seen.add(id(param))
            if param.requires_grad:
                total += 4 * param.numel()
            elif path in quantized and name == "weight":
                total += quantized_bytes(param.numel(), param.shape[0], cfg.quant)
            else:
                total += dtype_bytes * param.numel()
    return total


def dequantized_bytes(adapted: nn.Module, cfg: RunConfig) -> int:
    """fp32 copies of the quantized weights: bitsandbytes' CPU path dequantizes each layer's weight in
    every forward and backward; freed, they leave that much more slack in malloc's heaps."""
    if not quantizes_base(cfg):
        return 0
    modules = dict(adapted.model.named_modules())
    return sum(4 * modules[path].weight.numel() for path in quantizable_paths(adapted.model, cfg.quant))


# -- activations ----------------------------------------------------------------------------------


# Linear layers fed by the attention output or the MLP's inner activation: a LoRA there keeps its input
# too (the q/k/v and up/gate projections read the block's normed input, which is kept anyway).
OUTPUT_PROJECTIONS = {"o_proj", "down_proj", "c_proj", "o", "wo", "out_proj", "fc2", "dense_4h_to_h", "dense"}


BASE_COPIES = {"selective_params", "modules_to_save"}
"""Adapter containers that hold trained copies of base tensors (the block trains like the base would)."""


def adapter_parameter_marks() -> tuple[str, ...]:
    """Path pieces of parameters an adapter adds inside a block (`.lora_A.`, `.ia3_l.`...), read from every
    adapter layer class: the base's weights there stay frozen, so the block keeps the frozen path's activations
    plus the adapter's own."""
    return tuple(f".{name}." for name in sorted(adapter_containers() - BASE_COPIES))


def block_floats(adapted: nn.Module, hidden: int, mlp: int) -> list[float]:
    """Floats autograd keeps per token, for each block in order, from which tensors train there.

    A block where base weights train keeps every linear layer's input; a block with only adapters
    (LoRA, bottleneck, adaption prompt) or trained norms keeps the frozen path plus their inputs.
    A trained tensor at the input side (a soft prompt, a prefix, the embeddings) needs the gradient
    to reach the first block, so every block keeps at least the frozen path.
    """
    trained_matrices: dict[tuple[str, int], bool] = {}
    extra: dict[tuple[str, int], float] = {}
    norm_inputs: dict[tuple[str, int], float] = {}
    adapted_blocks: set[tuple[str, int]] = set()
    input_side = False
    marks = adapter_parameter_marks()
    embedding = _module_path(adapted.model, adapted.model.get_input_embeddings())
    for path, param in adapted.model.named_parameters():
        position = block_position(path)
        if position is None:
            input_side = input_side or (param.requires_grad and path.startswith(embedding + "."))
            continue
        owned_by_adapter = any(mark in path for mark in marks)
        trained_matrices[position] = trained_matrices.get(position, False) or (
            param.requires_grad and param.ndim >= 2 and not owned_by_adapter)
        if param.requires_grad and owned_by_adapter:
            adapted_blocks.add(position)
        if param.requires_grad and param.ndim == 2 and ".adapter_up." in path:  # bottleneck: its activation, kept for up
            extra[position] = extra.get(position, 0.0) + 2 * param.shape[1]
        if param.requires_grad and param.ndim == 1 and path.endswith("weight"):  # a norm's scale needs its normed input
            norm_inputs[position] = norm_inputs.get(position, 0.0) + hidden
    for path, module in adapted.model.named_modules():
        position = block_position(path)
        if isinstance(module, LoraLinear) and position is not None and module.adapter_names():
            dropout = any(isinstance(d, nn.Dropout) for d in module.lora_dropout.values())
            kept_input = dropout or path.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS
            dora = bool(len(module.lora_magnitude_vector))
            extra[position] = extra.get(position, 0.0) + module.in_features * kept_input + 2 * module.out_features * dora
    frozen, trained = 6 * hidden + 3 * mlp, 10 * hidden + 4 * mlp
    per_block = []
    for position in sorted(trained_matrices):
        if trained_matrices[position]:
            per_block.append(trained + extra.get(position, 0.0))
        elif position in adapted_blocks or position in extra or position in norm_inputs:
            per_block.append(frozen + extra.get(position, 0.0) + norm_inputs.get(position, 0.0))
        else:
            per_block.append(frozen if input_side and not per_block else 0.0)
    return _from_lowest_trained(per_block, frozen)


def _module_path(model: nn.Module, module: nn.Module | None) -> str:
    return next((path for path, m in model.named_modules() if m is module), "\0")


def _from_lowest_trained(per_block: list[float], frozen_floats: float) -> list[float]:
    """Blocks below the lowest trained one keep nothing; frozen blocks above it keep their inputs' path."""
    first = next((i for i, floats in enumerate(per_block) if floats), len(per_block))
    return [0.0 if i < first else (floats or frozen_floats) for i, floats in enumerate(per_block)]


def activation_bytes(adapted: nn.Module, batch: BatchShape, dtype_bytes: int, virtual_tokens: int = 0) -> float:
    """Kept activations for one forward of `batch` (each row `virtual_tokens` longer with a soft prompt),
    plus the fp32 target logits and their gradient."""
    config = adapted.model.config
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.d_model
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None) or getattr(config, "n_inner", None) or 4 * hidden
    tokens = batch.rows * (batch.length + virtual_tokens)
    kept = sum(block_floats(adapted, hidden, mlp)) * tokens * dtype_bytes
    logits = 2 * 4 * batch.targets * config.vocab_size
    return kept + logits


def run_batches(cfg: RunConfig) -> list[BatchShape]:
    """The shape of every step's (micro-)batch in this run's training order (tokenizes the config's data)."""
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    config = AutoConfig.from_pretrained(path)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    arch = architecture_of(config)
    flat = (cfg.train.padding_free and get_method(cfg.method).capabilities.padding_free and not seq2seq
            and arch is not None and arch.padding_free)  # one unpadded row per forward
    if cfg.objective != "sft":  # preference pairs: both answers of every pair in the forward, ~2x the activations
        return [batch_shape(units, flat) for units in preference_micro_batches(cfg, tokenizer)]
    data = build_train_data(cfg, load_tasks(cfg.data, cfg.train.seed), tokenizer, seq2seq)
    per_epoch = math.ceil(len(data.units) / cfg.train.batch_size)
    steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    rows = cfg.train.micro_batch_size or cfg.train.batch_size
    shapes = []
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        ids = epoch_batches(data.lengths, cfg.train.batch_size, cfg.train.seed, epoch)[index]
        for start in range(0, len(ids), rows):
            shapes.append(batch_shape([data.units[i] for i in ids[start : start + rows]], flat))
    return shapes


def batch_shape(units: list[dict[str, Any]], flat: bool) -> BatchShape:
    """The forward shape of one micro-batch of tokenized examples (one unpadded row when `flat`)."""
    targets = sum(sum(1 for t in u["labels"] if t != -100) for u in units)
    lengths = [len(u["input_ids"]) for u in units]
    return BatchShape(1, sum(lengths), targets) if flat else BatchShape(len(units), max(lengths), targets)


def estimate_memory(cfg: RunConfig, batches: list[BatchShape] | None = None) -> MemoryEstimate:
    """Peak training memory of `cfg` over `batches` (default: the run's own batches, from its data)."""
    device = resolve_device(cfg.train.device)
    dtype, _ = choose_dtype(cfg.train.precision, device, full_finetune=get_method(cfg.method).section is None)
    dtype_bytes = torch.finfo(dtype).bits // 8
    adapted = meta_model(cfg)
    trainable, total = adapted.trainable_counts()
    batches = batches if batches is not None else run_batches(cfg)
    virtual = cfg.prompt_tuning.num_virtual_tokens if cfg.method == "prompt_tuning" else 0
    activations = {b: activation_bytes(adapted, b, dtype_bytes, virtual) for b in set(batches)}
    worst = max(activations, key=activations.get)
    optimizer = ADAM_BYTES[effective_optimizer(cfg.train.optimizer, device)] * trainable
    slack = ALLOCATOR_SHARE * activations[worst] + dequantized_bytes(adapted, cfg)
    return MemoryEstimate(
        cfg.method, trainable, total, int(weight_bytes(adapted, cfg, dtype_bytes)), 4 * trainable, int(optimizer),
        int(activations[worst]), int(max(0.0, slack - 4 * trainable)), RUNTIME_BYTES, worst,
    )
