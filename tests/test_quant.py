"""QLoRA's quantized base against transformers' own bitsandbytes loading, merging without re-quantizing,
PEFT loading a QLoRA adapter onto a full-precision base, and the 8-bit / paged optimizer choice."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from conftest import build_model, quantized_forward_atol
from peftkit import AdaptedModel, LoraConfig, attach
from peftkit.config import QuantConfig, TrainConfig
from peftkit.methods.quant import (
    dense_weight,
    is_quantized,
    merge_dequantized,
    quantizable_paths,
    quantize_base,
    weight_bytes,
)
from peftkit.train.optim import build_optimizer

import bitsandbytes  # noqa: E402,F401  (the quantization backend under test)
import peft  # noqa: E402  (a test dependency: the reference implementation)
VOCAB = 400
FP32 = {"compute_dtype": "fp32"}  # tests asserting fp32 figures say so: `auto` computes in bf16 on bf16-native hosts



def inputs(kind):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    return {"input_ids": ids, **({"decoder_input_ids": ids[:, :4]} if kind == "t5" else {})}


def logits(model, kind):
    with torch.no_grad():
        return model(**inputs(kind)).logits


def randomize_lora(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_base_matches_transformers_bitsandbytes(kind, double_quant, tmp_path):
    """What bitsandbytes guarantees on every CPU: the same quantized state (packed 4-bit codes, absmax, nested
    statistics, quant map) and the same dequantized weights; the logits then agree within `quantized_forward_atol`
    (exactly where bitsandbytes has a single CPU path)."""
    build_model(kind, VOCAB).save_pretrained(tmp_path)
    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    reference = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                   bnb_4bit_compute_dtype=torch.float32)
    theirs = cls.from_pretrained(tmp_path, quantization_config=reference, device_map="cpu")
    ours = cls.from_pretrained(tmp_path)
    quantize_base(ours, QuantConfig(double_quant=double_quant, **FP32))
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert set(our_state) == set(their_state)  # same layers quantized (T5 keeps `wo` in fp32, as transformers does)
    for key, value in our_state.items():
        assert torch.equal(value, their_state[key]), key
    quantized = [path for path, module in ours.named_modules() if is_quantized(module)]
    assert quantized and quantized == [path for path, module in theirs.named_modules() if is_quantized(module)]
    for path in quantized:
        assert torch.equal(dense_weight(ours.get_submodule(path)), dense_weight(theirs.get_submodule(path))), path
    expected = logits(theirs, kind)
    torch.testing.assert_close(logits(ours, kind), expected, rtol=0, atol=quantized_forward_atol(float(expected.abs().max())))


def test_memory_report_counts_packed_weights_and_block_scales():
    model = build_model("llama", VOCAB)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies
    dense_bytes = sum(p.numel() * 4 for p in model.parameters()) + buffer_bytes
    linear = [m for p, m in model.named_modules() if p in quantizable_paths(model, QuantConfig())]
    report = quantize_base(model, QuantConfig(double_quant=True))
    assert report.bytes_before == dense_bytes and report.layers == len(linear) == 14
    packed = sum(m.weight.numel() for _, m in model.named_modules() if is_quantized(m))
    assert packed == sum(m.in_features * m.out_features for m in linear) // 2  # two 4-bit codes per byte
    states = [m.weight.quant_state for m in model.modules() if is_quantized(m)]
    scale_bytes = sum(s.absmax.numel() + 4 * (s.code.numel() + s.state2.absmax.numel() + s.state2.code.numel()) for s in states)
    kept = sum(p.numel() * 4 for n, p in model.named_parameters() if not is_quantized(model.get_submodule(n.rsplit(".", 1)[0])))
    assert report.bytes_after == weight_bytes(model) == kept + packed + scale_bytes + buffer_bytes
    assert all(s.absmax.dtype == torch.uint8 for s in states)  # double quantization: the block scales are 8-bit


def test_gpt2_conv1d_is_quantized_and_dequantizes_back_to_conv1d():
    model = build_model("gpt2", VOCAB)
    quantize_base(model, QuantConfig(**FP32))
    assert is_quantized(model.transformer.h[0].attn.c_attn)
    adapted = attach(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["c_attn", "c_fc"]))
    randomize_lora(adapted)
    trained = logits(adapted, "gpt2")
    merged, report = merge_dequantized(adapted, inputs("gpt2"), QuantConfig(**FP32))
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)  # a GPT-2 checkpoint stores (in, out) again
    assert report.max_logit_error < max(1e-4, quantized_forward_atol(float(trained.abs().max())))


@pytest.mark.parametrize(("bits", "kind"), [(4, "llama"), (8, "llama"), (4, "t5")])
def test_merge_dequantizes_instead_of_requantizing(bits, kind, caplog, tmp_path):
    model = build_model(kind, VOCAB)
    quantize_base(model, QuantConfig(bits=bits, **FP32))
    adapted = attach(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_dora=bits == 4))
    randomize_lora(adapted)
    trained = logits(adapted, kind)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        merged, report = merge_dequantized(adapted, inputs(kind), QuantConfig(bits=bits, **FP32))
    assert not any(is_quantized(m) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # 4-bit: the dequantized matmul is the quantized layer's own arithmetic, so the merge is exact in fp32
    # (to bf16 rounding where bitsandbytes' fused CPU kernel ran the quantized forward);
    # 8-bit: LLM.int8 also rounds the activations to int8, which a float model does not, so the gap is that rounding
    assert report.max_logit_error < (max(1e-4, quantized_forward_atol(float(trained.abs().max()))) if bits == 4 else 0.1)
    assert report.requantized_logit_error > report.max_logit_error
    assert "instead of re-quantizing" in caplog.text
    merged.save_pretrained(tmp_path)
    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    torch.testing.assert_close(logits(cls.from_pretrained(tmp_path), kind), logits(merged, kind), rtol=0, atol=0)
    assert float((logits(merged, kind) - trained).abs().max()) == pytest.approx(report.max_logit_error)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_loads_qlora_adapter_onto_full_precision_base(kind, tmp_path):
    quantized = build_model(kind, VOCAB)
    quantize_base(quantized, QuantConfig())
    ours = attach(quantized, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    randomize_lora(ours)
    ours.save_adapter(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build_model(kind, VOCAB), str(tmp_path / "a"))
    full_precision = AdaptedModel(build_model(kind, VOCAB))
    full_precision.load_adapter(tmp_path / "a")
    torch.testing.assert_close(logits(theirs, kind), logits(full_precision, kind), rtol=1e-5, atol=1e-5)
    assert theirs.peft_config["default"].peft_type == peft.PeftType.LORA


def test_adamw_8bit_keeps_8bit_states_on_cpu():
    weight = nn.Parameter(torch.randn(4096))
    optimizer = build_optimizer([weight], TrainConfig(optimizer="adamw_8bit", lr=1e-2), torch.device("cpu"))
    before = weight.detach().clone()
    weight.grad = torch.randn(4096)
    optimizer.step()
    assert type(optimizer).__name__ == "AdamW8bit"
    assert optimizer.state[weight]["state1"].dtype == torch.uint8
    assert not torch.equal(weight.detach(), before)


@pytest.mark.parametrize(("name", "expected"), [("paged_adamw_32bit", "AdamW"), ("paged_adamw_8bit", "AdamW8bit")])
def test_paged_optimizers_fall_back_off_cuda_with_a_note(name, expected, caplog):
    with caplog.at_level(logging.INFO, logger="peftkit"):
        optimizer = build_optimizer([nn.Parameter(torch.randn(8))], TrainConfig(optimizer=name), torch.device("cpu"))
    assert type(optimizer).__name__ == expected
    assert "pages its states through CUDA" in caplog.text


def test_layers_whose_width_misses_the_4bit_block_stay_in_full_precision(caplog):
    """A Qwen2 with hidden 96: q/k/v/o and up/gate read 96 features (not a multiple of 64) and stay float,
    named in a warning; down_proj reads 192 (3 blocks) and is quantized; forward and backward run."""
    from transformers import Qwen2Config

    from peftkit.methods.quant import BLOCK_SIZE, is_quantized

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=400, hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    with caplog.at_level("WARNING", logger="peftkit.methods.quant"):
        quantize_base(model, QuantConfig(bits=4))
    kept = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not is_quantized(m) and p != "lm_head"]
    assert kept and all(model.get_submodule(p).in_features % BLOCK_SIZE for p in kept)
    assert is_quantized(model.model.layers[0].mlp.down_proj)  # reads 192 = 3 blocks
    assert all(p in caplog.text for p in kept)
    adapted = attach(model, LoraConfig(r=2, target_modules="all-linear"))
    adapted(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    with torch.no_grad():
        adapted(input_ids=torch.tensor([[5]]))  # one token: bitsandbytes' single-row path
