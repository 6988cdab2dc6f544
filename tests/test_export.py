"""GGUF export, checked by a consumer: transformers' GGUF loader reads the files back.

A merged export read back (`from_pretrained(folder, gguf_file=...)`) must give the merged model's
logits: f32 within 1e-4; f16 / bf16 / q8_0 within 1e-4 of the merged model whose weights were
rounded the way the file stores them (f16 and bf16: round to nearest even; q8_0: ggml's block
formula, written out again here), and the q8_0 error against f32 is reported. An adapter-only
export is checked against the merged and base exports: in GGUF's own layout, merged weight ==
base weight + alpha / r * B A, which is what llama.cpp's `--lora` computes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import CORPUS, build_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

from peftkit import AdaptedModel, LoraConfig
from peftkit.errors import ExportError
from peftkit.export import describe_gguf, export_gguf, export_lora_gguf
from peftkit.export.gguf_model import tensor_type
from peftkit.export.ollama import chat_pieces, modelfile_text

PROMPTS = ["We propose a new method for summarization of scientific papers.", "It is very cold outside.",
           "<|im_start|>user\nWhat did this paper find?<|im_end|>\n<|im_start|>assistant\n"]
TARGETS = {"llama": "all-linear", "qwen2": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}


def tiny_config(kind: str, vocab: int):
    """Tiny configs of the three exported families (GPT-2 keeps n_positions 1024: transformers' GGUF
    loader reads the context length into `n_ctx`, so the position table must have GPT2Config's default size)."""
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2,
                           pad_token_id=2, bos_token_id=None)
    if kind == "qwen2":  # more embedding rows than tokens, as Qwen2 has: the file pads the vocabulary
        return Qwen2Config(vocab_size=vocab + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2,
                           pad_token_id=2, bos_token_id=None)
    return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, eos_token_id=2, bos_token_id=2, pad_token_id=2)


def base_folder(root: Path, kind: str, tokenizer) -> Path:
    folder = root / f"base-{kind}"
    if not folder.is_dir():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer)))
        with torch.no_grad():  # random norms and biases too, so a misplaced vector shows in the logits
            for name, param in model.named_parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param) * 0.1)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def adapter_folder(root: Path, kind: str, tokenizer, name: str = "adapter", meta: dict | None = None,
                   **lora) -> tuple[Path, torch.nn.Module]:
    """A LoRA adapter with non-zero B on the tiny base, saved; returns (folder, the merged model)."""
    base = base_folder(root, kind, tokenizer)
    adapted = AdaptedModel(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    config = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": TARGETS[kind], **lora}
    adapted.add_adapter("default", LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, param in adapted.named_parameters():
            if "lora_B" in pname or "modules_to_save" in pname or "magnitude" in pname:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)
    meta = {"prompt_format": {"templates": ["Summarize:\n\n{abstract}"], "chat": True, "system_prompt": None}, **(meta or {})}
    folder = adapted.save_adapter(root / f"{name}-{kind}", metadata=meta)
    return folder, adapted.merge_and_unload().eval()


def read_back(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def max_logit_error(a, b, tokenizer) -> float:
    return max(float((a(**tokenizer(p, return_tensors="pt")).logits - b(**tokenizer(p, return_tensors="pt")).logits).abs().max())
               for p in PROMPTS)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


# -- merged models: read back by transformers --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_merged_f32_export_matches_the_merged_model(kind, root, tok):
    adapter, merged = adapter_folder(root, kind, tok)
    result = export_gguf(adapter, root / f"{kind}-f32.gguf", dtype="f32")
    assert result.merge_max_logit_error is not None and result.merge_max_logit_error < 1e-4
    back = read_back(result.path)
    assert max_logit_error(back, merged, tok) <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(base_folder(root, kind, tok)).eval()
    assert max_logit_error(back, base, tok) > 1e-2  # the adapter is in the file, not only the base


def rounded_like_the_file(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """The merged model with each weight stored as the exporter stores it, written out independently."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2 or "wpe" in name:
                continue  # vectors, norms and position embeddings stay f32
            if dtype == "f16":
                param.copy_(param.half().float())
            elif dtype == "bf16":
                param.copy_(param.bfloat16().float())
            else:  # q8_0: blocks of 32 along a row; d = max|x| / 127 stored as f16; q = round half away from zero
                blocks = param.reshape(-1, 32)
                d = blocks.abs().amax(dim=1, keepdim=True) / 127
                q = torch.where(d == 0, 0.0, blocks / d)
                q = torch.sign(q) * torch.floor(q.abs() + 0.5)
                param.copy_((q * d.half().float()).reshape(param.shape))
    return model


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_rounded_exports_store_exactly_the_rounded_weights(dtype, root, tok, capsys):
    adapter, merged = adapter_folder(root, "llama", tok, name=f"adapter-{dtype}")
    back = read_back(export_gguf(adapter, root / f"llama-{dtype}.gguf", dtype=dtype).path)
    error_vs_f32 = max_logit_error(back, merged, tok)
    assert max_logit_error(back, rounded_like_the_file(merged, dtype), tok) <= 1e-4
    assert 0 < error_vs_f32 < 0.1
    with capsys.disabled():
        print(f"\n{dtype}: max |logit - f32 merged logit| = {error_vs_f32:.2e} (tiny Llama, 3 prompts)")


def test_a_qlora_adapter_is_merged_into_the_dequantized_base_and_the_error_reported(root, tok):
    from peftkit.config import QuantConfig
    from peftkit.methods.quant import merge_dequantized, quantize_base

    quant = {"bits": 4, "compute_dtype": "fp32"}
    adapter, unquantized = adapter_folder(root, "llama", tok, name="qlora", meta={"run_config": {"method": "qlora", "quant": quant}})
    result = export_gguf(adapter, root / "qlora.gguf", dtype="f32")
    quantized = AutoModelForCausalLM.from_pretrained(base_folder(root, "llama", tok), dtype=torch.float32)
    quantize_base(quantized, QuantConfig(**quant))
    adapted = AdaptedModel(quantized)
    adapted.load_adapter(adapter)
    probe = tok("The merged model must agree with the adapter.", return_tensors="pt")
    expected, report = merge_dequantized(adapted.eval(), dict(probe), QuantConfig(**quant))
    assert result.merge_max_logit_error == pytest.approx(report.max_logit_error)
    back = read_back(result.path)
    assert max_logit_error(back, expected, tok) <= 1e-4
    assert max_logit_error(back, unquantized, tok) > 1e-3  # the 4-bit base it trained on, not the full-precision one


def test_q8_0_keeps_vectors_in_f32_and_falls_back_to_f16_for_partial_blocks():
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q8_0") == gguf.GGMLQuantizationType.F32
    assert tensor_type("position_embd.weight", (1024, 64), "q8_0") == gguf.GGMLQuantizationType.F32
    assert tensor_type("blk.0.attn_q.weight.lora_b", (64, 4), "q8_0") == gguf.GGMLQuantizationType.F16
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q8_0") == gguf.GGMLQuantizationType.Q8_0


def test_tokenizer_chat_template_and_eos_travel_with_the_model(root, tok):
    adapter, _ = adapter_folder(root, "llama", tok)
    path = export_gguf(adapter, root / "llama-tok.gguf", dtype="f32").path
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in CORPUS[:6] + PROMPTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.chat_template == tok.chat_template
    assert back.eos_token_id == tok.eos_token_id == 2
    model = read_back(path)
    assert model.config.eos_token_id == 2  # generation stops at <|im_end|>
    info = describe_gguf(path)
    assert info["kind"] == "model" and info["architecture"] == "llama" and info["chat template"] == "yes"
    assert info["tensors"] == len([n for n in model.state_dict() if "lm_head" not in n])  # tied head: one copy
    assert json.loads(info["peftkit.prompt_format"])["templates"] == ["Summarize:\n\n{abstract}"]


def test_full_model_folder_exports_the_same_way(root, tok):
    base = base_folder(root, "qwen2", tok)
    back = read_back(export_gguf(base, root / "qwen2-base.gguf", dtype="f32").path)
    assert max_logit_error(back, AutoModelForCausalLM.from_pretrained(base).eval(), tok) <= 1e-4


# -- adapter only: the sum llama.cpp's --lora computes ------------------------------------------------------
def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
            for t in reader.tensors}


@pytest.mark.parametrize("kind,lora", [("llama", {}), ("gpt2", {}), ("llama", {"use_rslora": True, "r": 8})])
def test_adapter_export_adds_up_to_the_merged_export(kind, lora, root, tok):
    name = "adapter-rs" if lora else "adapter"
    adapter, _ = adapter_folder(root, kind, tok, name=name, **lora)
    merged_path = root / f"{kind}-{name}-merged.gguf"
    export_gguf(adapter, merged_path, dtype="f32")
    base_path = export_gguf(base_folder(root, kind, tok), root / f"{kind}-{name}-base.gguf", dtype="f32").path
    result = export_lora_gguf(adapter, root / f"{kind}-{name}-lora.gguf", dtype="f32")
    reader = gguf.GGUFReader(result.path)
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    alpha_field = reader.get_field("adapter.lora.alpha")
    assert alpha_field.types == [gguf.GGUFValueType.FLOAT32]
    r = lora.get("r", 4)
    expected_scale = 8.0 / math.sqrt(r) if lora else 8.0 / r
    assert alpha_field.contents() / r == pytest.approx(expected_scale)
    lora_tensors, base, merged = gguf_tensors(result.path), gguf_tensors(base_path), gguf_tensors(merged_path)
    adapted = sorted(n[: -len(".lora_a")] for n in lora_tensors if n.endswith(".lora_a"))
    assert len(adapted) == {"llama": 14, "gpt2": 8}[kind]  # all-linear: 7 per block; c_proj names two layers
    for weight in adapted:
        delta = expected_scale * lora_tensors[f"{weight}.lora_b"] @ lora_tensors[f"{weight}.lora_a"]
        np.testing.assert_allclose(base[weight] + delta, merged[weight], atol=1e-5)
    untouched = set(base) - set(adapted)
    assert all(np.array_equal(base[n], merged[n]) for n in untouched)
    assert describe_gguf(result.path)["kind"] == "adapter (lora)"


@pytest.mark.parametrize("lora,reason", [
    ({"use_dora": True}, "DoRA rescales each output row"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
])
def test_adapters_llama_cpp_cannot_apply_are_refused_but_merge(lora, reason, root, tok):
    adapter, merged = adapter_folder(root, "qwen2", tok, name="refused-" + next(iter(lora)), **lora)
    with pytest.raises(ExportError, match="drop --adapter-only") as info:
        export_lora_gguf(adapter, root / "refused.gguf")
    assert reason in str(info.value)
    back = read_back(export_gguf(adapter, root / f"merged-{next(iter(lora))}.gguf", dtype="f32").path)
    assert max_logit_error(back, merged, tok) <= 1e-4


def test_added_tokens_and_a_tied_head_are_refused(root, tok):
    adapter, _ = adapter_folder(root, "llama", tok, name="tied-head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ExportError, match="lm_head is not a weight.*shares the embedding"):
        export_lora_gguf(adapter, root / "tied.gguf")
    adapter, _ = adapter_folder(root, "llama", tok, name="added-tokens")
    tok.save_pretrained(adapter)  # what training with data.add_special_tokens leaves beside the adapter
    with pytest.raises(ExportError, match="added tokens"):
        export_lora_gguf(adapter, root / "added.gguf")


def test_soft_prompts_are_refused_with_the_reason(root, tok):
    from peftkit.methods.prompt_tuning import PromptTuningConfig

    adapted = AdaptedModel(AutoModelForCausalLM.from_pretrained(base_folder(root, "llama", tok)))
    adapted.add_adapter("default", PromptTuningConfig(num_virtual_tokens=4, init="random"))
    folder = adapted.save_adapter(root / "prompt-tuning")
    with pytest.raises(ExportError, match="PROMPT_TUNING is not LoRA.*cannot be merged into the weights either"):
        export_lora_gguf(folder, root / "pt.gguf")
    with pytest.raises(Exception, match="soft prompt adds input positions"):
        export_gguf(folder, root / "pt-merged.gguf")


# -- what is refused, and atomic writes -----------------------------------------------------------------------
def test_bad_destinations_and_sources_are_refused(root, tok, model_dirs):
    adapter, _ = adapter_folder(root, "llama", tok)
    for out, message in [(adapter / "x.gguf", "inside the folder being exported"), (root / "x.bin", "ending in .gguf"),
                         (root, "is a folder")]:
        with pytest.raises(ExportError, match=message):
            export_gguf(adapter, out)
    with pytest.raises(ExportError, match="choose one of f32, f16, bf16, q8_0"):
        export_gguf(adapter, root / "x.gguf", dtype="q4_k")
    with pytest.raises(ExportError, match="no such folder"):
        export_gguf(root / "missing", root / "x.gguf")
    with pytest.raises(ExportError, match="supported: llama, qwen2, gpt2"):
        export_gguf(model_dirs["t5"], root / "t5.gguf")
    (root / "exists.gguf").write_bytes(b"keep")
    with pytest.raises(ExportError, match="pass --overwrite"):
        export_gguf(adapter, root / "exists.gguf")
    assert (root / "exists.gguf").read_bytes() == b"keep"


def test_a_failed_write_leaves_nothing_behind(root, tok, monkeypatch):
    import peftkit.export.gguf_model as gguf_model

    folder = root / "atomic"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(gguf_model, "write_header_and_tensors", fail)
    with pytest.raises(OSError, match="disk vanished"):
        export_gguf(base_folder(root, "llama", tok), folder / "model.gguf", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["model.gguf"]
    assert (folder / "model.gguf").read_bytes() == b"old"


# -- Ollama ----------------------------------------------------------------------------------------------------
def test_modelfile_converts_the_chat_template_to_go(root, tok):
    text = modelfile_text("m.gguf", tok)
    assert text.startswith("FROM ./m.gguf\n")
    assert ('{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
            '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n') in text
    assert '{{ end }}{{ end }}<|im_start|>assistant\n"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    adapter, _ = adapter_folder(root, "llama", tok)
    result = export_gguf(adapter, root / "ollama" / "tuned.gguf", dtype="f32", ollama=True)
    assert result.modelfile == root / "ollama" / "Modelfile"
    assert result.modelfile.read_text().startswith("FROM ./tuned.gguf\n")


def test_a_default_system_prompt_becomes_a_conditional_preamble():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                               "{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}{% endif %}"
                               "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert chat_pieces(tokenizer).preamble == "<|im_start|>system\nBe kind.<|im_end|>\n"
    assert ('{{ if .Messages }}{{ if ne (index .Messages 0).Role "system" }}<|im_start|>system\nBe kind.<|im_end|>\n'
            '{{ end }}{{ else }}') in modelfile_text("m.gguf", tokenizer)


def test_a_template_that_rewrites_contents_is_refused():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] | upper }}{% endfor %}"
    with pytest.raises(ExportError, match="write the Modelfile's TEMPLATE by hand"):
        modelfile_text("m.gguf", tokenizer)


# -- the command line -------------------------------------------------------------------------------------------
def test_cli_export_then_inspect(root, tok, capsys):
    from peftkit import cli

    adapter, _ = adapter_folder(root, "gpt2", tok)
    out = root / "cli" / "tuned.gguf"
    cli.main(["export", str(adapter), "--out", str(out), "--dtype", "q8_0", "--ollama"])
    printed = capsys.readouterr().out
    assert "model GGUF (gpt2, q8_0" in printed and "max |merged - unmerged| logit difference" in printed
    assert "ollama create NAME -f" in printed
    cli.main(["inspect", str(out)])
    shown = capsys.readouterr().out
    for part in ("gpt2", "MOSTLY_Q8_0", "Q8_0 x", "chat template", "yes", "bos / eos / pad ids"):
        assert part in shown, shown
    cli.main(["export", str(adapter), "--adapter-only", "--out", str(root / "cli" / "lora.gguf")])
    assert "--lora" in capsys.readouterr().out
    cli.main(["inspect", str(root / "cli" / "lora.gguf")])
    assert "adapter (lora)" in capsys.readouterr().out
