"""Selective tuning: which tensors a selection trains, tied tensors, its file layout, and loading it back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model
from peftkit import AdaptedModel, ConfigError, attach
from peftkit.adapters import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from peftkit.config import SelectiveConfig

VOCAB = 400


def trained_names(adapted: AdaptedModel) -> set[str]:
    """Real names of the base tensors the adapter trains (as written to its file)."""
    return {k.removeprefix(PEFT_PREFIX) for k in adapted.adapter_state_dict()}


def test_bitfit_trains_exactly_the_biases_of_gpt2():
    model = build_model("gpt2", VOCAB)
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") and ".h." in n}
    adapted = attach(model, SelectiveConfig(top_layers=0, biases_only=True))
    assert trained_names(adapted) == biases
    assert adapted.trainable_counts()[0] == sum(p.numel() for n, p in build_model("gpt2", VOCAB).named_parameters() if n in biases)


def test_bitfit_on_a_model_without_biases_says_what_to_do():
    with pytest.raises(ConfigError, match="no bias vectors"):
        attach(build_model("llama", VOCAB), SelectiveConfig(top_layers=0, biases_only=True))


def test_top_layers_counts_per_stack_and_layers_accepts_negative_indices():
    top = attach(build_model("t5", VOCAB), SelectiveConfig(top_layers=1, components=["mlp"]))
    assert trained_names(top) == {f"{stack}.block.1.layer.{i}.DenseReluDense.{w}.weight"
                                  for stack, i in (("encoder", 1), ("decoder", 2)) for w in ("wi", "wo")}
    last = attach(build_model("llama", VOCAB), SelectiveConfig(layers=[-1], components=["attention"]))
    assert trained_names(last) == {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"}


def test_norms_only_includes_final_norm_when_named():
    adapted = attach(build_model("llama", VOCAB), SelectiveConfig(top_layers=0, components=["norms"]))
    assert trained_names(adapted) == {"model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}


def test_out_of_range_layer_is_a_config_error():
    with pytest.raises(ConfigError, match="blocks 0..1"):
        attach(build_model("llama", VOCAB), SelectiveConfig(layers=[5]))


def test_tied_embedding_and_head_train_one_tensor():
    model = build_model("llama", VOCAB)  # tie_word_embeddings: lm_head.weight is embed_tokens.weight
    adapted = attach(model, SelectiveConfig(components=["head"]))
    assert trained_names(adapted) == {"model.embed_tokens.weight"}
    trained = adapted.model.model.embed_tokens.selective_params["default"].weight
    with torch.no_grad():
        trained[5] += 1.0  # moves both the input embedding of token 5 and its output logit
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        changed = adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            base = adapted(input_ids=ids).logits
    assert not torch.allclose(changed[:, :, 5], base[:, :, 5])  # the head reads the trained copy
    adapted(input_ids=ids).logits.sum().backward()
    assert trained.grad is not None and adapted.trainable_counts()[0] == trained.numel()


def test_file_layout_and_round_trip(tmp_path):
    adapted = attach(build_model("gpt2", VOCAB), SelectiveConfig(top_layers=1, components=["attention", "norms"]))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
    adapted.save_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PEFTKIT_SELECTIVE"
    assert config["peftkit"] == {"method": "selective", "layers": [], "top_layers": 1,
                                 "components": ["attention", "norms"], "biases_only": False}
    saved = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    base_names = {PEFT_PREFIX + n for n, _ in build_model("gpt2", VOCAB).named_parameters()}
    assert set(saved) <= base_names and "base_model.model.transformer.h.1.attn.c_attn.weight" in saved
    fresh = AdaptedModel(build_model("gpt2", VOCAB))
    fresh.load_adapter(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_peft_refuses_the_selective_folder_instead_of_misloading_it(tmp_path):
    import peft
    attach(build_model("llama", VOCAB), SelectiveConfig()).save_adapter(tmp_path / "a")
    with pytest.raises((KeyError, ValueError)):
        peft.PeftModel.from_pretrained(build_model("llama", VOCAB), str(tmp_path / "a"))
