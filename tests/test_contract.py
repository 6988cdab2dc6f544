"""The adapter contract, run over every method x model kind (causal Llama, GPT-2 Conv1D, T5 seq2seq, and beyond
text: a ViT image classifier and a Whisper speech encoder-decoder).

A new method joins by adding one line to METHOD_CASES.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import bf16_atol, build_model
from peftkit import AdaptedModel, AdapterError, ConfigError, LoraConfig, attach
from peftkit.adapters import PEFT_PREFIX, WEIGHTS_NAME
from peftkit.config import AdaptionPromptConfig, BottleneckConfig, PrefixTuningConfig, PromptTuningConfig, QuantConfig, SelectiveConfig
from peftkit.methods.quant import quantize_base
from peftkit.methods.registry import METHODS

# name -> (config factory, has identity init, can merge)
METHOD_CASES = {
    "lora": (lambda: LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), True, True),
    "lora_qv_default": (lambda: LoraConfig(r=2, alpha=4, dropout=0.0), True, True),
    "rslora": (lambda: LoraConfig(r=8, alpha=8, dropout=0.0, use_rslora=True, init="gaussian"), True, True),
    # soft prompts: no identity init (the virtual tokens change every output) and nothing to merge
    "prompt_tuning": (lambda: PromptTuningConfig(num_virtual_tokens=3, init="random"), False, False),
    "prefix_tuning": (lambda: PrefixTuningConfig(num_virtual_tokens=3, init="random"), False, False),
    "adaption_prompt": (lambda: AdaptionPromptConfig(adapter_len=3, adapter_layers=1), True, False),  # zero gate
    "bottleneck_houlsby": (lambda: BottleneckConfig(placement="houlsby", reduction_factor=8), True, False),
    "bottleneck_pfeiffer": (lambda: BottleneckConfig(placement="pfeiffer", reduction_factor=4, activation="gelu"), True, False),
    "dora": (lambda: LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_dora=True), True, True),
    "dora_rslora": (lambda: LoraConfig(r=8, alpha=8, dropout=0.0, use_rslora=True, use_dora=True, init="gaussian"), True, True),
    # QLoRA: LoRA on a base quantized by QUANTIZED_BASES below; "base" means the quantized base throughout, and
    # merging into it refuses (it would re-quantize; tests/test_quant.py checks the dequantize-then-merge path)
    "qlora": (lambda: LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), True, False),
    "qlora_int8_dora": (lambda: LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True), True, False),
    # selective tuning trains copies of base tensors: the fresh copies equal the base, and merging copies them in
    "selective_top_attention": (lambda: SelectiveConfig(top_layers=1, components=["attention", "norms"]), True, True),
    "selective_tied_embeddings": (lambda: SelectiveConfig(components=["embeddings", "head"]), True, True),
    "bitfit": (lambda: SelectiveConfig(top_layers=0, biases_only=True), True, True),
}
# every other method of the registry joins with its default config and declared capabilities, so a new
# method file is covered here without editing this suite
_COVERED = {type(factory()) for factory, _, _ in METHOD_CASES.values()}
REGISTRY_CASES = {name: (m.config_cls, m.capabilities.identity_init, m.capabilities.mergeable)
                  for name, m in METHODS.items() if m.config_cls is not None and m.config_cls not in _COVERED}
METHOD_CASES |= REGISTRY_CASES
# compute in fp32 whatever the host: `auto` would compute the 4-bit base in bf16 on bf16-native hosts, and
# tests/test_contract_loss.py compares these bases' gradients to fp32 precision
QUANTIZED_BASES = {"qlora": QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="fp32"),
                   "qlora_int8_dora": QuantConfig(bits=8)}
# (method, kind) pairs the method refuses with a ConfigError (tested below instead of the contract)
UNSUPPORTED = {("prefix_tuning", "t5"), ("adaption_prompt", "t5"), ("bitfit", "llama"), ("bitfit", "t5")}  # no biases
# soft prompts and prefixes need token inputs; ViT reads pixels and Whisper's encoder reads audio features
UNSUPPORTED |= {(m, k) for m in ("prompt_tuning", "prefix_tuning", "adaption_prompt") for k in ("vit", "whisper")}
KINDS = ["llama", "gpt2", "t5", "vit", "whisper"]
# beyond text, one case per family keeps the suite fast: the LoRA family (the point of these kinds), a quantized
# base, bottleneck adapters and selective tuning (Whisper also its tied decoder embeddings and positions)
_BEYOND_TEXT = ["lora", "lora_qv_default", "rslora", "dora", "qlora", "bottleneck_houlsby", "selective_top_attention"]
KIND_METHODS = {"vit": [*_BEYOND_TEXT, *REGISTRY_CASES], "whisper": [*_BEYOND_TEXT, "selective_tied_embeddings", *REGISTRY_CASES]}
VOCAB = 400


def inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if kind == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": torch.randint(3, VOCAB, (2, 7), generator=g)}
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 7), generator=g)
    return out


def base_model(method: str, kind: str, precision: str = "fp32"):
    """The tiny base the case starts from (in bf16 for bf16 cases; quantized for QLoRA cases)."""
    model = build_model(kind, VOCAB)
    if precision == "bf16":
        model.to(torch.bfloat16)
    if method in QUANTIZED_BASES:
        quantize_base(model, QUANTIZED_BASES[method])
    return model


def logits(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind)).logits


def randomize_adapter(adapted: AdaptedModel, seed: int = 3) -> None:
    """Make B non-zero so the adapter changes the output (a fresh one is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# every (method, architecture) pair the method supports, in fp32; the refused pairs are tested as errors below.
# In bf16 (the frozen base as `precision: auto` trains it on bf16-native hosts) the LoRA family on a decoder and on
# GPT-2's Conv1D: few cases, since bf16 is emulated (slow) on AVX2-only hosts
PAIRS = [(method, kind) for method in METHOD_CASES for kind in KINDS
         if (method, kind) not in UNSUPPORTED and method in KIND_METHODS.get(kind, METHOD_CASES)]
BF16_PAIRS = [("lora", "llama"), ("dora", "llama"), ("lora", "gpt2")]
pairs = pytest.mark.parametrize(("method", "kind", "precision"),
                                [(m, k, "fp32") for m, k in PAIRS] + [(m, k, "bf16") for m, k in BF16_PAIRS])


def merge_atol(precision: str, reference: torch.Tensor) -> float:
    """Merged vs unmerged logits. fp32: summation order only. bf16: the merged weight W + BA is rounded to bf16
    (u = 2^-8 relative per element) where the unmerged path rounds the base output and the sum instead, in
    every layer of both blocks: 8u of the largest logit (measured: up to 2.7u; the randomized adapters move
    the logits by 60-170% of the largest, so a wrong scale or orientation still fails)."""
    return 1e-5 if precision == "fp32" else bf16_atol(reference, 8)


@pytest.mark.parametrize(("method", "kind"), sorted(UNSUPPORTED))
def test_unsupported_architecture_is_a_config_error(method, kind):
    with pytest.raises(ConfigError, match="use "):  # the message names methods that do fit
        attach(build_model(kind, VOCAB), METHOD_CASES[method][0]())


@pairs
def test_fresh_adapter_is_identity(method, kind, precision):
    factory, identity, _ = METHOD_CASES[method]
    model = base_model(method, kind, precision)
    base = logits(model, kind)
    adapted = attach(model, factory())
    if identity:
        torch.testing.assert_close(logits(adapted, kind), base, rtol=0, atol=0)
    else:  # soft prompts condition every position on the virtual tokens from the start
        assert not torch.allclose(logits(adapted, kind), base)


@pairs
def test_save_load_same_logits_and_only_adapter_tensors(method, kind, precision, tmp_path):
    factory, _, _ = METHOD_CASES[method]
    adapted = attach(base_model(method, kind, precision), factory())
    randomize_adapter(adapted)
    expected = logits(adapted, kind)
    adapted.save_adapter(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert sum(t.numel() for t in saved.values()) == trainable
    base_keys = {PEFT_PREFIX + k for k in base_model(method, kind).state_dict()}
    if isinstance(factory(), SelectiveConfig):  # its file holds the selected base tensors, under their real names
        assert set(saved) <= base_keys
    else:
        assert not set(saved) & base_keys, "only adapter tensors are saved"
    fresh = AdaptedModel(base_model(method, kind, precision))
    fresh.load_adapter(tmp_path / "a")
    torch.testing.assert_close(logits(fresh, kind), expected, rtol=0, atol=0)


@pairs
def test_merge_matches_unmerged_and_unmerge_is_exact(method, kind, precision):
    factory, _, can_merge = METHOD_CASES[method]
    if not can_merge:  # non-linear or input-side methods refuse to merge, with the reason
        adapted = attach(base_model(method, kind, precision), factory())
        with pytest.raises(AdapterError, match="cannot be merged"):
            adapted.merge_adapter()
        return
    model = base_model(method, kind, precision)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = attach(model, factory())
    randomize_adapter(adapted)
    unmerged = logits(adapted, kind)
    adapted.merge_adapter()
    torch.testing.assert_close(logits(adapted, kind), unmerged, rtol=1e-5, atol=merge_atol(precision, unmerged))
    adapted.unmerge_adapter()
    torch.testing.assert_close(logits(adapted, kind), unmerged, rtol=0, atol=0)
    base_now = {k.replace(".base_layer", ""): v for k, v in adapted.model.state_dict().items() if ".lora_" not in k}
    for key, value in before.items():
        assert torch.equal(base_now[key], value), f"unmerge changed {key}"


@pairs
def test_merge_and_unload_gives_plain_model(method, kind, precision):
    factory, _, can_merge = METHOD_CASES[method]
    if not can_merge:
        with pytest.raises(AdapterError, match="cannot be merged"):
            attach(base_model(method, kind, precision), factory()).merge_and_unload()
        return
    adapted = attach(base_model(method, kind, precision), factory())
    randomize_adapter(adapted)
    expected = logits(adapted, kind)
    plain = adapted.merge_and_unload()
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, kind), expected, rtol=1e-5, atol=merge_atol(precision, expected))


@pairs
def test_disable_is_base(method, kind, precision):
    factory, _, _ = METHOD_CASES[method]
    model = base_model(method, kind, precision)
    base = logits(model, kind)
    adapted = attach(model, factory())
    randomize_adapter(adapted)
    assert not torch.allclose(logits(adapted, kind), base)
    with adapted.disable_adapter():
        torch.testing.assert_close(logits(adapted, kind), base, rtol=0, atol=0)
    assert not torch.allclose(logits(adapted, kind), base), "the adapter is active again after the block"


@pairs
def test_only_adapter_parameters_get_gradients(method, kind, precision):
    factory, _, _ = METHOD_CASES[method]
    adapted = attach(base_model(method, kind, precision), factory())
    randomize_adapter(adapted)
    adapted.train()
    adapted(**inputs(kind)).logits.float().pow(2).mean().backward()
    for name, p in adapted.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
            assert p.dtype == torch.float32, f"{name}: trained weights stay fp32 on a {precision} base"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
