"""The fast paths give the plain paths' values and gradients: fused linear cross-entropy, fused LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit.train import loss as loss_module
from peftkit.train.loss import linear_cross_entropy


def _plain(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("upstream", ["sum", "weighted"])
def test_linear_cross_entropy_matches_plain(monkeypatch, with_bias, upstream):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 64 * 50)  # several chunks, the last one short
    torch.manual_seed(0)
    n, h, v = 150, 16, 50
    inputs = [torch.randn(n, h), torch.randn(v, h),
              torch.randn(v, dtype=torch.float32) if with_bias else None]
    targets = torch.randint(0, v, (n,))
    weights = torch.rand(n) if upstream == "weighted" else None
    grads = []
    for fn in (_plain, linear_cross_entropy):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
        losses = fn(*leaves, targets)
        (losses * weights).sum().backward() if weights is not None else (losses.sum() * 0.37).backward()
        grads.append((losses.detach(), [t.grad for t in leaves if t is not None]))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = grads
    torch.testing.assert_close(fused_loss, plain_loss)
    for fused, plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, plain)


def test_linear_cross_entropy_frozen_head_and_no_grad():
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 8, requires_grad=True), torch.randn(30, 8)
    targets = torch.randint(0, 30, (40,))
    linear_cross_entropy(hidden, weight, None, targets).sum().backward()
    reference = hidden.detach().clone().requires_grad_(True)
    _plain(reference, weight, None, targets).sum().backward()
    torch.testing.assert_close(hidden.grad, reference.grad)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, None, targets), _plain(hidden, weight, None, targets))


def _tiny_llama(attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=256)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def _examples(seed, count=5):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(3, 40)
        ids = [rng.randrange(97) for _ in range(n)]
        prompt = rng.randint(1, n - 1)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_padding_free_step_equals_padded_step():
    """Loss and LoRA gradients of one step: padded batch == one padding-free row (per-example attention)."""
    from peftkit.adapters import AdaptedModel
    from peftkit.config import LoraConfig
    from peftkit.train.attention import padding_free
    from peftkit.train.objectives import ObjectiveForward
    from peftkit.train.step import accumulate_gradients
    from peftkit.train.tokens import TokenBatches

    examples = _examples(0)
    results = []
    for flat in (False, True):
        model = _tiny_llama()
        adapted = AdaptedModel(model)
        torch.manual_seed(1)
        adapted.add_adapter("default", LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a trained-looking adapter, so every gradient is non-zero
        with padding_free(model, enabled=flat) as active:
            assert active == flat
            result = accumulate_gradients(ObjectiveForward(TokenBatches(pad_id=0, flat=flat), adapted), examples, 2)
        grads = {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}
        results.append((result, grads))
    (padded, padded_grads), (flat_result, flat_grads) = results
    assert flat_result.target_tokens == padded.target_tokens
    assert flat_result.positions == flat_result.tokens < padded.positions  # no padding at all
    assert abs(flat_result.loss - padded.loss) < 1e-5
    for name, grad in padded_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_padding_free_needs_a_supported_model():
    from peftkit.train.attention import padding_free

    with padding_free(_tiny_llama(attn="eager")) as active:
        assert not active  # eager attention has no per-segment path here: padded batches
    model = _tiny_llama()
    with padding_free(model) as active:
        assert active and model.config._attn_implementation == "peftkit_sdpa"
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_lora_equals_plain_path(monkeypatch, dropout, conv1d):
    """Output and every gradient (x, A, B) of the fused LoRA node equal the module-by-module path."""
    from transformers.pytorch_utils import Conv1D

    from peftkit.config import LoraConfig
    from peftkit.methods.lora import LoraLinear

    torch.manual_seed(0)
    base = Conv1D(12, 10) if conv1d else torch.nn.Linear(10, 12)
    base.requires_grad_(False)
    layer = LoraLinear(base)
    layer.add_adapter("a", LoraConfig(r=4, alpha=8, dropout=dropout))
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    layer.set_active("a")
    layer.train()
    x0 = torch.randn(3, 5, 10)
    upstream = torch.randn(3, 5, 12)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(LoraLinear, "fused", fused)
        x = x0.clone().requires_grad_(True)
        layer.zero_grad()
        torch.manual_seed(7)  # the same dropout mask both times
        out = layer(x)
        (out * upstream).sum().backward()
        runs.append((out.detach(), x.grad, layer.lora_A["a"].weight.grad.clone(), layer.lora_B["a"].weight.grad.clone()))
    for fused, plain in zip(*runs):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert base.weight.grad is None  # the frozen base gets no gradient
