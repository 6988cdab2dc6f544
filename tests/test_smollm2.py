"""The embedded default, for real and offline: SmolLM2-135M-Instruct from its GGUF package, aclsum from its package."""

from __future__ import annotations

import pytest
import torch

from peftkit import LoraConfig, attach, format_trainable
from peftkit.config import load_config
from peftkit.data import collate, load_task, tokenize_task_rows
from peftkit.generate import generate_texts
from peftkit.models import load_model, resolve_model_path
from peftkit.train.loss import loss_sum_and_count


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype=torch.float32)


def test_builtin_model_converts_once_to_a_plain_checkpoint(smollm2):
    path = resolve_model_path("smollm2-135m")
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.model_type == "llama" and not hasattr(model.config, "quantization_config")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2  # the pad == EOS case the data code must handle
    assert "<|im_start|>" in tokenizer.chat_template
    assert path.endswith("smollm2-135m")


def test_aclsum_tasks_have_the_documented_splits():
    for aspect in ("outcome", "challenge", "approach"):
        task = load_task(load_config(None, [f"data.dataset=aclsum/{aspect}"]).data, seed=0)
        assert task.counts == {"train": 100, "validation": 50, "test": 100}
        assert all(row["summary"] and row["abstract"] for row in task.train)


def test_lora_step_and_generation_on_the_real_model(smollm2):
    model, tokenizer = smollm2
    cfg = load_config(None)
    task = load_task(cfg.data, 0)
    examples, _ = tokenize_task_rows(task.train[:2], tokenizer, task, 512)
    assert all(e["labels"][-1] == tokenizer.eos_token_id for e in examples), "EOS is a target"
    adapted = attach(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    # r * (in + out) per linear layer: q 576->576, k and v 576->192 (3 KV heads), o 576->576, gate/up 576->1536, down 1536->576
    per_layer = 16 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 2 * (576 + 1536) + (1536 + 576))
    expected = 30 * per_layer
    assert expected == 4_884_480
    assert adapted.trainable_report() == format_trainable(expected, 134_515_008 + expected)
    loss_sum, count = loss_sum_and_count(adapted, collate(examples, tokenizer.pad_token_id))
    (loss_sum / count).backward()
    assert 1.0 < float(loss_sum / count) < 6.0
    grads = [p.grad for p in adapted.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    answer = generate_texts(adapted, tokenizer, task.format, task.test[:1], max_new_tokens=12)[0]
    assert len(answer.split()) >= 3
