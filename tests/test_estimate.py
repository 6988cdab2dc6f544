"""The memory estimator's arithmetic against what a tiny model really holds: parameter, gradient and
optimizer bytes exactly, quantized weights exactly, activations against autograd's saved tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import build_tokenizer
from peftkit.config import config_from_dict
from peftkit.estimate import BatchShape, estimate_memory
from peftkit.methods import quant
from peftkit.precision import choose_dtype
from peftkit.train.loss import loss_sum_and_count
from peftkit.train.setup import prepare_model

SHAPE = BatchShape(rows=3, length=48, targets=30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """4 blocks, MLP width not a multiple of the hidden size, so the h and i terms are told apart."""
    folder = tmp_path_factory.mktemp("est-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def run_config(model_dir, method, precision="fp32", **sections):
    """The estimate depends on the dtype: every test names the precision it asserts in (auto differs per host)."""
    return config_from_dict({"model": str(model_dir), "method": method, "train": {"precision": precision}, **sections})


def prepared(model_dir, method, precision="fp32", **sections):
    """The config and the model as training builds it: loaded in the run's dtype, then adapted."""
    cfg = run_config(model_dir, method, precision, **sections)
    dtype, _ = choose_dtype(precision, torch.device("cpu"), full_finetune=method == "full")
    adapted = prepare_model(cfg, AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype))
    return cfg, adapted


def saved_activation_bytes(model) -> int:
    """Bytes autograd keeps for backward in one training forward (each storage once, weights excluded)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (SHAPE.rows, SHAPE.length), generator=g)
    labels = ids.clone()
    labels[:, : SHAPE.length - SHAPE.targets // SHAPE.rows] = -100
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum_and_count(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return sum(n for ptr, n in kept.items() if ptr not in weights)


METHODS = [
    ("lora", {}),
    ("lora", {"lora": {"use_dora": True}}),
    ("lora", {"lora": {"dropout": 0.0, "target_modules": "all-linear"}}),
    ("full", {}),
    ("selective", {"selective": {"top_layers": 2}}),
    ("selective", {"selective": {"top_layers": 0, "components": ["norms"]}}),
    ("selective", {"selective": {"top_layers": 0, "components": ["embeddings"]}}),  # the gradient crosses every block
    ("prompt_tuning", {"prompt_tuning": {"init": "random"}}),  # rows 20 virtual tokens longer
    ("prefix_tuning", {"prefix_tuning": {"init": "random"}}),
    ("adaption_prompt", {"adaption_prompt": {"adapter_layers": 2}}),
    ("bottleneck", {"bottleneck": {"placement": "houlsby"}}),
]


# every method in fp32; in bf16 one adapter method and full fine-tuning (kept in fp32) cover the dtype
# term, since bf16 is emulated, hence slow, on AVX2-only hosts
@pytest.mark.parametrize(("method", "sections", "precision"),
                         [(m, s, "fp32") for m, s in METHODS] + [("lora", {}, "bf16"), ("full", {}, "bf16")])
def test_activations_match_autograd_saved_tensors(model_dir, method, sections, precision):
    cfg, adapted = prepared(model_dir, method, precision, **sections)
    estimate = estimate_memory(cfg, [SHAPE])
    assert estimate.activations == pytest.approx(saved_activation_bytes(adapted), rel=0.1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "full", "selective"])
def test_parameter_gradient_and_adam_bytes_are_exact(model_dir, method, precision):
    cfg, adapted = prepared(model_dir, method, precision)
    estimate = estimate_memory(cfg, [SHAPE])
    params = [p for p in adapted.parameters() if p.requires_grad]
    assert estimate.trainable_params == sum(p.numel() for p in params)
    assert estimate.weights == sum(p.numel() * p.element_size() for p in adapted.parameters())
    adapted(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    assert estimate.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params)
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert estimate.optimizer == state_bytes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_weight_bytes_are_exact(model_dir, double_quant, precision):
    cfg, adapted = prepared(model_dir, "qlora", precision, quant={"double_quant": double_quant})
    buffers = sum(b.numel() * b.element_size() for b in adapted.buffers())
    assert estimate_memory(cfg, [SHAPE]).weights == quant.weight_bytes(adapted) - buffers


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prompt_tuning", "bottleneck"])
def test_terms_sum_to_the_total(model_dir, method):
    estimate = estimate_memory(run_config(model_dir, method), [SHAPE])
    assert estimate.total == sum(size for _, size in estimate.rows())
    assert all(size >= 0 for _, size in estimate.rows()) and estimate.activations > 0 and estimate.runtime > 0


def test_full_fine_tuning_state_is_a_multiple_of_the_weights(model_dir):
    full = estimate_memory(run_config(model_dir, "full"), [SHAPE])
    lora = estimate_memory(run_config(model_dir, "lora"), [SHAPE])
    per_weight = (full.weights + full.gradients + full.optimizer) / full.total_params
    assert per_weight == 16  # fp32: weight 4 + gradient 4 + Adam's two states 8 bytes
    assert full.state_vs_weights > 8 > lora.gradients / lora.weights_16bit
    default_batch = estimate_memory(run_config(model_dir, "full"), [BatchShape(8, 512, 400)])
    assert default_batch.state_vs_weights >= 12, "the source material's 12-20x the 16-bit weights, activations included"


def test_estimate_command_compares_methods(model_dir):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", "estimate", str(model_dir), "--method", "full,lora,qlora",
                           "--seq-len", "32", "--set", "lora.r=4"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for expected in ("optimizer states", "activations", "full", "qlora", "training state / 16-bit weights"):
        assert expected in done.stdout
    bad = subprocess.run([sys.executable, "-m", "peftkit.cli", "estimate", str(model_dir), "--method", "nope"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_quantized_base_adds_its_dequantized_copies_to_the_slack(model_dir):
    lora = estimate_memory(run_config(model_dir, "lora"), [SHAPE])
    qlora = estimate_memory(run_config(model_dir, "qlora"), [SHAPE])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    body = sum(m.weight.numel() for n, m in model.named_modules()  # the layers 4-bit blocks fit (widths of 64s)
               if isinstance(m, torch.nn.Linear) and n != "lm_head" and m.in_features % 64 == 0)
    assert qlora.allocator - lora.allocator == pytest.approx(4 * body, abs=2)  # bitsandbytes dequantizes to fp32
