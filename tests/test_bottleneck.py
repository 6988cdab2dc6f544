"""Bottleneck adapters: placements per architecture, the arithmetic against hooks on a plain model, the file."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_model
from peftkit import AdaptedModel, AdapterError, ConfigError, attach
from peftkit.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter_weights
from peftkit.config import BottleneckConfig
from peftkit.methods.bottleneck import ACTIVATIONS

VOCAB = 400


def inputs(kind):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    out = {"input_ids": ids}
    if kind == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return out


def randomize(adapted, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize(
    ("kind", "placement", "expected"),
    [
        ("llama", "houlsby", ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"]),
        ("llama", "pfeiffer", ["model.layers.{i}.mlp.down_proj"]),
        ("gpt2", "houlsby", ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"]),
        ("t5", "pfeiffer", ["encoder.block.{i}.layer.1.DenseReluDense.wo", "decoder.block.{i}.layer.2.DenseReluDense.wo"]),
    ],
)
def test_placement_adapts_the_sublayer_outputs(kind, placement, expected):
    adapted = attach(build_model(kind, VOCAB), BottleneckConfig(placement=placement, reduction_factor=16))
    wanted = {p.format(i=i) for p in expected for i in range(2)}
    assert set(adapted.adapter_targets["default"]) == wanted
    per_adapter = 64 * 4 + 4 + 4 * 64 + 64  # down (64 -> 64/16) and up, with biases
    assert adapted.trainable_counts()[0] == per_adapter * len(wanted)


def test_t5_houlsby_skips_cross_attention():
    paths = attach(build_model("t5", VOCAB), BottleneckConfig()).adapter_targets["default"]
    assert len(paths) == 8 and not any("EncDecAttention" in p for p in paths)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_output_is_h_plus_up_act_down_h(kind, activation):
    """Reference: the same weights applied by forward hooks on a plain copy of the base."""
    adapted = attach(build_model(kind, VOCAB), BottleneckConfig(activation=activation, reduction_factor=8))
    randomize(adapted)
    plain = build_model(kind, VOCAB)
    act = ACTIVATIONS[activation]()
    for path in adapted.adapter_targets["default"]:
        layer = adapted.model.get_submodule(path)
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        plain.get_submodule(path).register_forward_hook(lambda m, args, out, d=down, u=up: out + u(act(d(out))))
    with torch.no_grad():
        torch.testing.assert_close(adapted(**inputs(kind)).logits, plain(**inputs(kind)).logits, rtol=1e-6, atol=1e-6)


def test_file_layout_and_peft_refuses_it(tmp_path):
    import peft
    adapted = attach(build_model("llama", VOCAB), BottleneckConfig(placement="pfeiffer", reduction_factor=8, activation="silu"))
    randomize(adapted)
    adapted.save_adapter(tmp_path / "a")
    raw = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert raw["peft_type"] == "PEFTKIT_BOTTLENECK" and raw["task_type"] == "CAUSAL_LM"
    assert raw["peftkit"] == {"method": "bottleneck", "placement": "pfeiffer", "reduction_factor": 8,
                              "activation": "silu", "sublayers": ["mlp.down_proj"]}
    assert sorted(read_adapter_weights(tmp_path / "a"))[:2] == [
        "base_model.model.model.layers.0.mlp.down_proj.adapter_down.bias",
        "base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight",
    ]
    with pytest.raises(KeyError, match="PEFTKIT_BOTTLENECK"):  # refused by name, never mis-loaded as another method
        peft.PeftModel.from_pretrained(build_model("llama", VOCAB), str(tmp_path / "a"))
    loaded = AdaptedModel(build_model("llama", VOCAB))
    loaded.load_adapter(tmp_path / "a")
    assert loaded.adapter_configs["default"] == adapted.adapter_configs["default"]


def test_damaged_peftkit_section_is_an_adapter_error(tmp_path):
    adapted = attach(build_model("llama", VOCAB), BottleneckConfig())
    adapted.save_adapter(tmp_path / "a")
    raw = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    raw["peftkit"]["activation"] = "softmax"
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match="softmax"):
        AdaptedModel(build_model("llama", VOCAB)).load_adapter(tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_NAME).is_file()


def test_merge_is_refused_because_it_is_non_linear():
    adapted = attach(build_model("gpt2", VOCAB), BottleneckConfig())
    with pytest.raises(AdapterError, match="non-linear"):
        adapted.merge_adapter()


def test_unknown_architecture_is_a_config_error():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))  # not in the table
    with pytest.raises(ConfigError, match="known for model types .*llama.*not 'bloom'; use lora"):
        attach(model, BottleneckConfig())


def test_family_in_the_architectures_table_gets_bottlenecks():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                     num_attention_heads=2, word_embed_proj_dim=32))
    paths = attach(model, BottleneckConfig()).adapter_targets["default"]
    assert paths == ["model.decoder.layers.0.self_attn.out_proj", "model.decoder.layers.0.fc2"]
