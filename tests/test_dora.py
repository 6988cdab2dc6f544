"""DoRA against HF PEFT, in the same test: files both ways, forward, gradients and merged weights (fp32)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model
from peftkit import AdaptedModel, LoraConfig, attach
from peftkit.adapters import WEIGHTS_NAME, read_adapter_config

import peft  # noqa: E402  (a test dependency: the reference implementation)
VOCAB = 400
KINDS = ["llama", "gpt2", "t5"]
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "t5": ["q", "v", "wo"]}


def inputs(kind):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    out = {"input_ids": ids}
    if kind == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return out


def randomize(model, seed=5):
    """Non-zero B and a magnitude away from ||W||, so every DoRA term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_dora(kind):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[kind], use_dora=True,
                          fan_in_fan_out=kind == "gpt2")
    model = peft.get_peft_model(build_model(kind, VOCAB), cfg)
    randomize(model)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_our_dora_adapter(kind, tmp_path):
    ours = attach(build_model(kind, VOCAB), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_dora=True))
    randomize(ours)
    with torch.no_grad():
        expected = ours(**inputs(kind)).logits
    ours.save_adapter(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == len(saved) // 3  # PEFT's key, no `.weight`
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(build_model(kind, VOCAB), str(tmp_path / "a"))
    assert not [w for w in caught if "key" in str(w.message).lower()], "PEFT warned about missing or unexpected keys"
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs(kind)).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_we_load_peft_dora_adapter(kind, tmp_path):
    theirs = peft_dora(kind)
    with torch.no_grad():
        expected = theirs(**inputs(kind)).logits
    theirs.save_pretrained(str(tmp_path / "p"))
    config, _ = read_adapter_config(tmp_path / "p")
    assert config.use_dora
    ours = AdaptedModel(build_model(kind, VOCAB))
    ours.load_adapter(tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs(kind)).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_peft(kind, tmp_path):
    """The weight norm is detached in both (DoRA section 4.3): same gradients for A, B and the magnitude."""
    theirs = peft_dora(kind)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = AdaptedModel(build_model(kind, VOCAB))
    ours.load_adapter(tmp_path / "p")
    for model in (theirs, ours):
        model(**inputs(kind)).logits.pow(2).mean().backward()
    their_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n.replace(".default", ""): p.grad for n, p in ours.model.named_parameters() if p.requires_grad}
    assert len(our_grads) == len(their_grads) > 0
    for name, grad in our_grads.items():
        match = [g for n, g in their_grads.items() if n.endswith(name)]
        assert len(match) == 1, name
        torch.testing.assert_close(grad, match[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_weights_match_peft(kind, tmp_path):
    theirs = peft_dora(kind)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = AdaptedModel(build_model(kind, VOCAB))
    ours.load_adapter(tmp_path / "p")
    their_weights = theirs.merge_and_unload().state_dict()
    our_weights = ours.merge_and_unload().state_dict()
    assert set(our_weights) == set(their_weights)
    for key, value in our_weights.items():
        torch.testing.assert_close(value, their_weights[key], rtol=1e-5, atol=1e-6)


def test_dora_trains_a_magnitude_per_output_feature():
    adapted = attach(build_model("llama", VOCAB), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    q_proj = adapted.model.model.layers[0].self_attn.q_proj
    magnitude = q_proj.lora_magnitude_vector["default"].weight
    assert magnitude.shape == (q_proj.out_features,) and magnitude.requires_grad
    torch.testing.assert_close(magnitude, q_proj.base_layer.weight.norm(dim=1))  # starts at ||W|| per row
    trainable, _ = adapted.trainable_counts()
    assert trainable == 2 * (4 * (64 + 64) + 64)  # two layers: A, B and one magnitude per output feature
