"""The exported files in llama.cpp itself (slow: llama-cpp-python builds llama.cpp from source).

Install: `.venv/bin/python -m pip install -c constraints.txt -e '.[llamacpp]'` (needs cmake and gcc:
`apt-get install -y cmake build-essential`), then `pytest -m slow tests/test_export_llama_cpp.py`.

Tiny Llama / Qwen2 / GPT-2: llama.cpp's logits for the merged GGUF, and for the base GGUF with the
adapter GGUF applied at load (`--lora`), equal the merged transformers model's. SmolLM2 (the
built-in default): the same greedy tokens as peftkit, merged and base + LoRA.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from test_export import PROMPTS, adapter_folder, base_folder, root, tok  # noqa: F401 (fixtures)

from peftkit import AdaptedModel, LoraConfig
from peftkit.export import export_gguf, export_lora_gguf
from peftkit.generate import generate_ids
from peftkit.models import resolve_model_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama_cpp is not importable: pip install -c constraints.txt -e '.[llamacpp]' (builds llama.cpp)"),
]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_llama_cpp_computes_the_merged_models_logits(kind, root, tok):  # noqa: F811
    from peftkit.export.llama_cpp import load_gguf, logits

    adapter, merged = adapter_folder(root, kind, tok)
    merged_path = export_gguf(adapter, root / f"cpp-{kind}-merged.gguf", dtype="f32").path
    base_path = export_gguf(base_folder(root, kind, tok), root / f"cpp-{kind}-base.gguf", dtype="f32").path
    lora_path = export_lora_gguf(adapter, root / f"cpp-{kind}-lora.gguf", dtype="f32").path
    ids = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        expected = merged(torch.tensor([ids])).logits[0].numpy()
    vocab = expected.shape[-1]
    # f32 weights and KV cache: Llama and Qwen2 agree to ~1e-6 (measured <= 9e-7); ggml computes GELU through
    # an f16 lookup table, which costs GPT-2 ~2e-4 (logits of scale 0.6). A wrong permutation costs ~0.5.
    atol = 1e-3 if kind == "gpt2" else 1e-5
    for llm, _ in (load_gguf(merged_path, kv_cache_f32=True), load_gguf(base_path, lora=lora_path, kv_cache_f32=True)):
        np.testing.assert_allclose(logits(llm, ids)[:, :vocab], expected, atol=atol, rtol=0)


def test_smollm2_greedy_tokens_match_peftkit(tmp_path):
    """The built-in default with a LoRA on q and v (random, non-zero B): greedy tokens in llama.cpp equal peftkit's."""
    from peftkit.export.llama_cpp import greedy, load_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapted = AdaptedModel(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    adapted.add_adapter("default", LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    adapter = adapted.save_adapter(tmp_path / "adapter")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("What is the capital of France?", "Summarize: we propose a faster tokenizer.")]
    prompts = [p["input_ids"] if isinstance(p, dict) else p for p in prompts]
    expected = [generate_ids(adapted, tokenizer, [ids], max_new_tokens=24)[0] for ids in prompts]
    merged = export_gguf(adapter, tmp_path / "merged.gguf", dtype="f32").path
    base_gguf = export_gguf("smollm2-135m", tmp_path / "base.gguf", dtype="f32").path
    lora = export_lora_gguf(adapter, tmp_path / "lora.gguf", dtype="f32").path
    for llm, _ in (load_gguf(merged), load_gguf(base_gguf, lora=lora)):
        assert [greedy(llm, ids, 24, {tokenizer.eos_token_id})[0] for ids in prompts] == expected
