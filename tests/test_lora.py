"""LoRA layer arithmetic, target matching and the several-adapters API."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import build_model
from peftkit import AdaptedModel, AdapterError, ConfigError, LoraConfig, attach
from peftkit.inject import match_targets
from peftkit.methods.lora import default_targets
from peftkit.methods.lora import LoraLinear


def test_source_figure_512x64_rank_8():
    layer = LoraLinear(nn.Linear(64, 512, bias=False))  # a 512x64 weight
    layer.add_adapter("default", LoraConfig(r=8))
    trainable = sum(p.numel() for p in layer.lora_A.parameters()) + sum(p.numel() for p in layer.lora_B.parameters())
    assert trainable == 4608 and layer.base_layer.weight.numel() == 32768


def test_lora_forward_is_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLinear(base)
    layer.add_adapter("a", LoraConfig(r=4, alpha=12, dropout=0.0))
    layer.set_active("a")
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(3, 16)
    expected = base(x) + (12 / 4) * x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_fan_in_fan_out_merge():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # in 16, out 24, weight stored (16, 24)
    layer = LoraLinear(conv)
    layer.add_adapter("a", LoraConfig(r=2, alpha=2, dropout=0.0))
    layer.set_active("a")
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(2, 5, 16)
    out = layer(x)
    layer.merge("a")
    torch.testing.assert_close(conv(x), out, rtol=1e-5, atol=1e-5)


def test_rslora_scaling():
    layer = LoraLinear(nn.Linear(8, 8))
    layer.add_adapter("a", LoraConfig(r=16, alpha=8, use_rslora=True))
    assert layer.scaling["a"] == pytest.approx(8 / 4)


def test_target_matching_suffix_regex_all_linear():
    model = build_model("llama", 400)
    assert all(p.endswith(("q_proj", "v_proj")) for p in match_targets(model, default_targets(model)))
    assert len(match_targets(model, ["q_proj"])) == 2
    assert match_targets(model, r"model\.layers\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    everything = match_targets(model, "all-linear")
    assert "lm_head" not in everything and len(everything) == 2 * 7


def test_target_matching_nothing_lists_linear_layers():
    with pytest.raises(ConfigError) as info:
        match_targets(build_model("llama", 400), ["query"])
    assert "q_proj" in str(info.value) and "down_proj" in str(info.value)


def test_architecture_defaults():
    gpt2, t5 = build_model("gpt2", 400), build_model("t5", 400)
    assert match_targets(gpt2, default_targets(gpt2)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert {p.rsplit(".", 1)[1] for p in match_targets(t5, default_targets(t5))} == {"q", "v"}


def test_several_adapters_add_switch_disable_delete():
    torch.manual_seed(0)
    model = build_model("llama", 400)
    ids = torch.randint(3, 400, (1, 8))
    base = model(input_ids=ids).logits
    adapted = attach(model, LoraConfig(r=2, dropout=0.0), name="one")
    adapted.add_adapter("two", LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "o_proj"]))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    out_two = adapted(input_ids=ids).logits  # "two" is active after adding it
    adapted.set_adapter("one")
    assert [n for n, p in adapted.named_parameters() if p.requires_grad and ".two." in n] == []
    out_one = adapted(input_ids=ids).logits
    assert not torch.allclose(out_one, out_two)
    with adapted.disable_adapter():
        torch.testing.assert_close(adapted(input_ids=ids).logits, base)
    adapted.delete_adapter("two")
    torch.testing.assert_close(adapted(input_ids=ids).logits, out_one)
    assert not any(".two." in n for n, _ in adapted.named_parameters())
    adapted.delete_adapter("one")
    assert not any("lora_" in n or "base_layer" in n for n, _ in adapted.named_parameters())


def test_attaching_an_existing_name_is_an_error():
    adapted = attach(build_model("llama", 400), LoraConfig(r=2))
    with pytest.raises(AdapterError, match="already attached"):
        adapted.add_adapter("default", LoraConfig(r=2))


def test_load_rejects_wrong_shapes_and_nan(tmp_path):
    adapted = attach(build_model("llama", 400), LoraConfig(r=4))
    adapted.save_adapter(tmp_path / "a")
    other = AdaptedModel(build_model("llama", 400))
    with pytest.raises(AdapterError):
        other.add_adapter("x", LoraConfig(r=8))
        other.load_adapter_state_dict("x", adapted.adapter_state_dict("default"), source="test")
    state = adapted.adapter_state_dict("default")
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    fresh = AdaptedModel(build_model("llama", 400))
    fresh.add_adapter("y", LoraConfig(r=4))
    with pytest.raises(AdapterError, match="NaN"):
        fresh.load_adapter_state_dict("y", state, source="test")
