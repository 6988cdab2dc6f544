"""`method: <each>` through the same training loop on a tiny model: DoRA, QLoRA (4- and 8-bit), selective, full."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import quantized_forward_atol, tiny_run_config
from peftkit import AdaptedModel
from peftkit.adapters import CONFIG_NAME, WEIGHTS_NAME
from peftkit.config import config_from_dict
from peftkit.artifacts import load_artifact
from peftkit.inference import merge_to_folder
from peftkit.train import run_training


def train(model_dir, data_file, out, method, **sections):
    raw = tiny_run_config(model_dir, data_file, out, max_steps=3)
    raw["method"] = method
    for key, values in sections.items():
        raw[key] = {**raw.get(key, {}), **values}
    result = run_training(config_from_dict(raw))
    assert result.steps == 3 and result.val_loss is not None and result.last_loss < result.first_loss
    return result


def test_dora_run_saves_a_dora_adapter(model_dirs, data_file, tmp_path):
    result = train(model_dirs["llama"], data_file, tmp_path / "run", "lora", lora={"use_dora": True})
    assert json.loads((result.adapter_dir / CONFIG_NAME).read_text())["use_dora"] is True
    adapted, _ = AdaptedModel.from_pretrained(result.adapter_dir)
    assert any("lora_magnitude_vector" in n for n, _ in adapted.named_parameters())


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_run_and_merge_report(bits, model_dirs, data_file, tmp_path, caplog):
    optimizer = "paged_adamw_32bit" if bits == 4 else "adamw_8bit"
    # the merge error is asserted in fp32: `auto` would compute the quantized base in bf16 on bf16-native hosts
    result = train(model_dirs["llama"], data_file, tmp_path / "run", "qlora", quant={"bits": bits, "compute_dtype": "fp32"},
                   train={"optimizer": optimizer, "precision": "fp32"})
    assert json.loads((result.adapter_dir / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    out, max_err = merge_to_folder(result.adapter_dir, tmp_path / "merged")
    assert "instead of re-quantizing" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        largest_logit = float(merged(input_ids=torch.arange(3, 40)[None]).logits.abs().max())
    # 4-bit: exact in fp32 up to bitsandbytes' fused bf16 CPU kernel; LLM.int8 also rounds activations, which the float merge does not
    assert max_err < (max(1e-4, quantized_forward_atol(largest_logit)) if bits == 4 else 0.1)


def test_selective_run_saves_real_tensor_names(model_dirs, data_file, tmp_path):
    result = train(model_dirs["llama"], data_file, tmp_path / "run", "selective",
                   selective={"top_layers": 1, "components": ["mlp", "norms"]})
    saved = load_file(str(result.adapter_dir / WEIGHTS_NAME))
    assert "base_model.model.model.layers.1.mlp.down_proj.weight" in saved
    assert not any("layers.0." in k for k in saved)
    loaded = load_artifact(result.adapter_dir)
    assert loaded.adapted is not None and loaded.generate([{"abstract": "We study things."}], max_new_tokens=3)


def test_full_fine_tuning_saves_a_full_model(model_dirs, data_file, tmp_path):
    result = train(model_dirs["llama"], data_file, tmp_path / "run", "full")
    assert result.trainable.endswith("trainable%: 100.0000")
    tuned = AutoModelForCausalLM.from_pretrained(result.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) == len(base.state_dict())  # every tensor trained (rotary buffers are not saved)
    loaded = load_artifact(result.adapter_dir)
    assert loaded.adapted is None and loaded.generate([{"abstract": "We study things."}], max_new_tokens=3)
