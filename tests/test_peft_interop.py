"""HF PEFT loads what peftkit saves and peftkit loads what PEFT saves: same logits within 1e-5 in fp32, and within
bf16 rounding on a bf16 base (as `precision: auto` trains on bf16-native hosts)."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings

import peft
import pytest
import torch
from conftest import bf16_atol, build_model

from peftkit import AdaptedModel, AdapterError, LoraConfig, attach, format_trainable
from peftkit.adapters import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

VOCAB = 400
KINDS = ["llama", "gpt2", "t5", "vit", "whisper"]
# every kind in fp32; a bf16 base for a decoder and GPT-2's Conv1D (bf16 is emulated, hence slow, on AVX2-only hosts)
ROUND_TRIPS = [(kind, "fp32") for kind in KINDS] + [("llama", "bf16"), ("gpt2", "bf16")]


def base(kind, precision="fp32"):
    return build_model(kind, VOCAB).to(torch.bfloat16 if precision == "bf16" else torch.float32)


def round_trip_atol(precision, reference):
    """fp32: summation order. bf16: PEFT and peftkit add the fp32 LoRA term to the bf16 base output with their
    own casts (each rounding is u = 2^-8 relative) in every adapted layer of both blocks, and a bf16 logit near
    the largest is itself only resolved to 2u of it: 16u of the largest logit (measured: up to 5.4u; the
    randomized adapters move the logits by 60-170% of the largest, so a wrong scale still fails)."""
    return 1e-5 if precision == "fp32" else bf16_atol(reference, 16)


def inputs(kind):
    if kind in ("vit", "whisper"):  # pixels / audio features
        from test_contract import inputs as feature_inputs

        return feature_inputs(kind)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    out = {"input_ids": ids}
    if kind == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 6), generator=g)
    return out


def out(model, kind):
    with torch.no_grad():
        return model(**inputs(kind)).logits


def randomize(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("kind", "precision"), ROUND_TRIPS)
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_peftkit_adapter(kind, precision, rslora, tmp_path):
    ours = attach(base(kind, precision), LoraConfig(r=4, alpha=16, dropout=0.0, target_modules="all-linear", use_rslora=rslora))
    randomize(ours)
    expected = out(ours, kind)
    ours.save_adapter(tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(base(kind, precision), str(tmp_path / "a"))
    about_keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not about_keys, f"PEFT warned about the adapter's keys: {about_keys}"
    torch.testing.assert_close(out(loaded, kind), expected, rtol=1e-5, atol=round_trip_atol(precision, expected))


@pytest.mark.parametrize(("kind", "precision"), ROUND_TRIPS)
def test_peftkit_loads_peft_adapter(kind, precision, tmp_path):
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "t5": ["q", "v", "wo"],
               "vit": ["q_proj", "v_proj", "fc2"], "whisper": ["q_proj", "v_proj", "fc1"]}[kind]
    theirs = peft.get_peft_model(base(kind, precision), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize(theirs)
    expected = out(theirs, kind)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = AdaptedModel(base(kind, precision))
    ours.load_adapter(tmp_path / "p")
    torch.testing.assert_close(out(ours, kind), expected, rtol=1e-5, atol=round_trip_atol(precision, expected))


def test_modules_to_save_round_trips_with_peft(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3)
        return LlamaForSequenceClassification(cfg).eval()

    ours = attach(build(), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], modules_to_save=["score"]))
    randomize(ours)
    with torch.no_grad():
        ours.model.score.modules_to_save["default"].weight.add_(1.0)
    ids = inputs("llama")["input_ids"]
    expected = ours(input_ids=ids).logits
    ours.save_adapter(tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    back = AdaptedModel(build())
    back.load_adapter(tmp_path / "a")
    torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_adapter_config_has_only_peft_keys(tmp_path):
    ours = attach(build_model("llama", VOCAB), LoraConfig(r=4))
    ours.save_adapter(tmp_path / "a")
    keys = set(json.loads((tmp_path / "a" / CONFIG_NAME).read_text()))
    peft_keys = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert keys <= peft_keys, f"keys PEFT does not know: {keys - peft_keys}"


def test_trainable_report_matches_peft_exactly(capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    theirs = peft.get_peft_model(GPT2LMHeadModel(GPT2Config()), peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))
    theirs.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    ours = attach(GPT2LMHeadModel(GPT2Config()), LoraConfig(r=8, target_modules=["c_attn"]))
    assert ours.trainable_report() == printed
    assert printed == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    assert format_trainable(4608, 32768 + 4608).startswith("trainable params: 4,608 ||")


def test_legacy_bin_adapter_loads_through_weights_only(tmp_path):
    theirs = peft.get_peft_model(build_model("llama", VOCAB), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize(theirs)
    expected = out(theirs, "llama")
    theirs.save_pretrained(str(tmp_path / "p"), safe_serialization=False)
    assert (tmp_path / "p" / LEGACY_WEIGHTS_NAME).is_file()
    ours = AdaptedModel(build_model("llama", VOCAB))
    ours.load_adapter(tmp_path / "p")
    torch.testing.assert_close(out(ours, "llama"), expected, rtol=1e-5, atol=1e-5)


class _Exploit:
    def __reduce__(self):
        return (print, ("this would have run code",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    ours = attach(build_model("llama", VOCAB), LoraConfig(r=4))
    ours.save_adapter(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_NAME).unlink()
    buf = io.BytesIO()
    torch.save({"x": _Exploit()}, buf)
    (tmp_path / "a" / LEGACY_WEIGHTS_NAME).write_bytes(buf.getvalue())
    with pytest.raises(AdapterError, match="refused"):
        AdaptedModel(build_model("llama", VOCAB)).load_adapter(tmp_path / "a")



def randomize_ia3(model, seed=11):
    """IA3 vectors start at ones (identity); move them so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_peftkit_ia3_adapter(kind, tmp_path):
    from peftkit.methods.ia3 import IA3Config

    ours = attach(build_model(kind, VOCAB), IA3Config())  # the architectures table's key, value, feed-forward
    randomize_ia3(ours)
    expected = out(ours, kind)
    ours.save_adapter(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"]
    loaded = peft.PeftModel.from_pretrained(build_model(kind, VOCAB), str(tmp_path / "a"))
    torch.testing.assert_close(out(loaded, kind), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_peftkit_loads_peft_ia3_adapter_and_merges_like_it(kind, tmp_path):
    targets, feedforward = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                            "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), "t5": (["k", "v", "wo"], ["wo"])}[kind]
    theirs = peft.get_peft_model(build_model(kind, VOCAB), peft.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    randomize_ia3(theirs)
    expected = out(theirs, kind)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = AdaptedModel(build_model(kind, VOCAB))
    ours.load_adapter(tmp_path / "p")
    torch.testing.assert_close(out(ours, kind), expected, rtol=1e-5, atol=1e-5)
    merged = ours.merge_and_unload()  # rows (and biases) or columns of W scaled, as PEFT merges
    torch.testing.assert_close(out(merged, kind), out(theirs.merge_and_unload(), kind), rtol=1e-5, atol=1e-5)
