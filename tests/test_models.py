"""Model resolution: built-in names, local folders, Hub ids (offline here), device and dtype choice."""

from __future__ import annotations

import pytest
import torch

from peftkit.errors import ModelError
from peftkit.models import load_model, resolve_device, resolve_model_path
from peftkit.precision import resolve_dtype


def test_local_folder_loads(model_dirs):
    model, tokenizer = load_model(str(model_dirs["llama"]))
    assert model.config.model_type == "llama" and tokenizer.pad_token_id is not None


def test_seq2seq_folder_loads_as_seq2seq(model_dirs):
    model, _ = load_model(str(model_dirs["t5"]))
    assert model.config.is_encoder_decoder


def test_hub_id_offline_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # passed to transformers
    with pytest.raises(ModelError, match="no network"):
        load_model("HuggingFaceTB/SmolLM2-135M")


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_missing_local_path_is_not_sent_to_the_hub():
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model_path("./models/nope")


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")
