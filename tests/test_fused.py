"""The fast paths give the plain paths' values and gradients: fused linear cross-entropy, fused LoRA, padding-free
rows; in fp32 and with bf16 weights (as `precision: auto` trains on bf16-native hosts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import bf16_atol
from peftkit.train import loss as loss_module
from peftkit.train.loss import linear_cross_entropy


def _plain(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("upstream", ["sum", "weighted"])
def test_linear_cross_entropy_matches_plain(monkeypatch, with_bias, upstream, dtype):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 64 * 50)  # several chunks, the last one short
    torch.manual_seed(0)
    n, h, v = 150, 16, 50
    inputs = [torch.randn(n, h).to(dtype), torch.randn(v, h).to(dtype), torch.randn(v).to(dtype) if with_bias else None]
    targets = torch.randint(0, v, (n,))
    weights = torch.rand(n) if upstream == "weighted" else None
    grads = []
    for fn in (_plain, linear_cross_entropy):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
        losses = fn(*leaves, targets)
        (losses * weights).sum().backward() if weights is not None else (losses.sum() * 0.37).backward()
        grads.append((losses.detach(), [t.grad for t in leaves if t is not None]))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = grads
    torch.testing.assert_close(fused_loss, plain_loss)  # fp32 losses from the same bf16 logits
    for fused, plain in zip(fused_grads, plain_grads):
        if dtype == torch.float32:
            torch.testing.assert_close(fused, plain)
        else:  # the plain path rounds dlogits and each matmul to bf16, the fused one accumulates in fp32 and rounds
            # once: 8 roundings of the largest gradient (measured: up to 2.2)
            assert fused.dtype == plain.dtype
            torch.testing.assert_close(fused, plain, rtol=0, atol=bf16_atol(plain, 8))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_free_step_equals_padded_step(dtype):
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
        model = _tiny_llama().to(dtype)
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
        # bf16: the padded and the flat attention round different shapes: 4 roundings of the largest gradient
        # (measured: 0.7); the fp32 LoRA gradients accumulate in fp32 either way
        atol = 1e-6 if dtype == torch.float32 else bf16_atol(grad, 4)
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=atol)


def test_padding_free_needs_a_supported_model():
    from peftkit.train.attention import padding_free

    with padding_free(_tiny_llama(attn="eager")) as active:
        assert not active  # eager attention has no per-segment path here: padded batches
    model = _tiny_llama()
    with padding_free(model) as active:
        assert active and model.config._attn_implementation == "peftkit_sdpa"
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_lora_equals_plain_path(monkeypatch, dropout, conv1d, dtype):
    """Output and every gradient (x, A, B) of the fused LoRA node equal the module-by-module path (a bf16 base
    too: both cast x to the fp32 adapter, and the result back, at the same points)."""
    from transformers.pytorch_utils import Conv1D

    from peftkit.config import LoraConfig
    from peftkit.methods.lora import LoraLinear

    torch.manual_seed(0)
    base = (Conv1D(12, 10) if conv1d else torch.nn.Linear(10, 12)).to(dtype)
    base.requires_grad_(False)
    layer = LoraLinear(base)
    layer.add_adapter("a", LoraConfig(r=4, alpha=8, dropout=dropout))
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    layer.set_active("a")
    layer.train()
    x0 = torch.randn(3, 5, 10).to(dtype)
    upstream = torch.randn(3, 5, 12).to(dtype)
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


# -- the fused loss through whatever the head is ---------------------------------------------------
HEAD_KINDS = ["plain", "lora_head", "lora_head_tied", "lora_head_disabled", "modules_to_save", "resized", "tied_full",
              "dora_head"]


def _tiny_qwen2(tied: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, tie_word_embeddings=tied)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()  # fp32


def _adapted_head(kind: str):
    """A tiny Qwen2 (untied unless the kind says tied) with the head in the given state, adapters randomised."""
    from peftkit.adapters import AdaptedModel
    from peftkit.config import LoraConfig

    model = _tiny_qwen2(tied=kind in ("lora_head_tied", "tied_full"))
    adapted = AdaptedModel(model)
    targets = ["q_proj", "v_proj", "lm_head"] if kind.startswith(("lora_head", "dora")) else ["q_proj", "v_proj"]
    if kind == "resized":  # data.add_special_tokens: more rows, embeddings and head trained with the adapter
        model.resize_token_embeddings(105)
    if kind == "tied_full":
        model.requires_grad_(True)
    else:
        save = {"modules_to_save": ["lm_head"], "resized": ["embed_tokens", "lm_head"]}.get(kind, [])
        adapted.add_adapter("default", LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets, modules_to_save=save,
                                                  use_dora=kind == "dora_head"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:  # B != 0, so lora_A gets a gradient too
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapted


def _batch() -> dict[str, torch.Tensor]:
    from peftkit.data.batching import collate

    return collate(_examples(3), pad_id=0)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_fused_loss_equals_plain_for_every_head(kind):
    """Loss and every trainable gradient (lm_head lora_A / lora_B, a modules_to_save copy, tied weights): the fused
    linear cross-entropy over the labelled positions == cross-entropy of the model's full logits. fp32."""
    from contextlib import nullcontext

    from peftkit.train.loss import fused_head, supports_selective_logits, token_losses

    adapted = _adapted_head(kind)
    assert supports_selective_logits(adapted)
    batch = _batch()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    context = adapted.disable_adapter() if kind == "lora_head_disabled" else nullcontext()
    results = []
    with context:
        exact = fused_head(adapted.model.get_output_embeddings())
        assert (exact is None) == (kind == "dora_head"), "only DoRA's head falls back to full logits"
        for compute in ("fused", "plain"):
            adapted.zero_grad(set_to_none=True)
            if compute == "fused":
                loss = token_losses(adapted, batch).sum()
            else:
                logits = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
            if kind != "lora_head_disabled":  # disabled: nothing trains, the loss alone is compared
                loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in adapted.named_parameters() if p.grad is not None}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    head_grads = [n for n in plain_grads if "lm_head" in n or (kind == "tied_full" and "embed_tokens" in n)]
    if kind in ("lora_head", "lora_head_tied", "dora_head"):
        assert any("lm_head.lora_A" in n for n in head_grads) and any("lm_head.lora_B" in n for n in head_grads), head_grads
    if kind in ("modules_to_save", "resized", "tied_full", "lora_head_tied", "lora_head", "dora_head"):
        assert head_grads and all(plain_grads[n].abs().sum() > 0 for n in head_grads)


def test_lora_on_an_untied_head_trains_its_b(tmp_path):
    """The issue's report: `target_modules: [q_proj, v_proj, lm_head]` on an untied Qwen2 saved lm_head.lora_B all zeros."""
    import json

    from safetensors.torch import load_file

    from conftest import build_tokenizer, tiny_run_config
    from peftkit.config import config_from_dict
    from peftkit.train import run_training

    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"abstract": f"Problem {i}. A method.", "summary": f"Gains on {i}."}) + "\n" for i in range(8)))
    raw = tiny_run_config(tmp_path / "qwen2", rows, tmp_path / "run", max_steps=2, precision="fp32")
    raw["lora"]["target_modules"] = ["q_proj", "v_proj", "lm_head"]
    raw["generate"]["num_samples"] = 0
    result = run_training(config_from_dict(raw))
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    head_b = [t for name, t in saved.items() if "lm_head.lora_B" in name]
    assert head_b and head_b[0].abs().sum() > 0
