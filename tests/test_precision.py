"""`precision: auto` and the PEFTKIT_CPU_BF16 override: what is chosen, and the reason given."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import subprocess_env, tiny_run_config
from peftkit.config import config_from_dict
from peftkit.errors import ConfigError
from peftkit.precision import CPU_BF16_ENV, choose_dtype, cpu_bf16, cpu_supports_bf16, resolve_dtype
from peftkit.train import run_training

CPU = torch.device("cpu")


@pytest.mark.parametrize(("value", "dtype"), [("1", torch.bfloat16), ("0", torch.float32)])
def test_override_decides_auto_on_cpu(monkeypatch, value, dtype):
    monkeypatch.setenv(CPU_BF16_ENV, value)
    assert choose_dtype("auto", CPU) == (dtype, f"forced by {CPU_BF16_ENV}={value}")
    assert cpu_supports_bf16() is (value == "1")


@pytest.mark.parametrize("value", ["yes", "2", "true", "bf16"])
def test_invalid_override_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(CPU_BF16_ENV, value)
    with pytest.raises(ConfigError, match=rf"{CPU_BF16_ENV}='{value}': use 1 .* 0 .* unset"):
        resolve_dtype("auto", CPU)


def test_empty_override_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "")
    assert cpu_bf16()[1].startswith(("CPU reports", "CPU has no native bf16", "CPU flags unreadable"))


@pytest.mark.parametrize(("flags", "native", "reason"), [
    ({"avx2", "avx512f", "amx_bf16", "avx512_bf16"}, True, "CPU reports AMX-BF16"),
    ({"avx2", "avx512f", "avx512_bf16"}, True, "CPU reports AVX512-BF16"),
    ({"avx2", "avx512f"}, False, "CPU has no native bf16 (AVX-512 without BF16)"),
    ({"sse4_2", "avx2"}, False, "CPU has no native bf16 (AVX2 only)"),
    ({"sse4_2"}, False, "CPU has no native bf16 (no AVX2)"),
])
def test_cpu_flags_decide_without_override(monkeypatch, flags, native, reason):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    assert cpu_bf16(frozenset(flags)) == (native, reason)


@pytest.mark.parametrize("forced", ["0", "1"])
def test_explicit_precision_ignores_the_cpu(monkeypatch, forced):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert choose_dtype("fp32", CPU) == (torch.float32, "precision: fp32 in config")
    assert choose_dtype("bf16", CPU) == (torch.bfloat16, "precision: bf16 in config")


def test_full_finetuning_keeps_fp32_master_weights(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    dtype, reason = choose_dtype("auto", CPU, full_finetune=True)
    assert dtype == torch.float32
    assert reason == f"fp32 master weights for full fine-tuning (bf16 otherwise: forced by {CPU_BF16_ENV}=1)"
    assert choose_dtype("fp32", CPU, full_finetune=True) == (torch.float32, "precision: fp32 in config")


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision 'fp16': use auto, bf16 or fp32"):
        choose_dtype("fp16", CPU)


# -- what `peftkit train` reports -----------------------------------------------------------------
def summary_precision(out) -> dict[str, str]:
    return json.loads((out / "summary.json").read_text())["precision"]


@pytest.mark.parametrize(("forced", "dtype"), [("0", "fp32"), ("1", "bf16")])
def test_train_command_says_what_auto_chose_and_why(model_dirs, data_file, tmp_path, forced, dtype):
    raw = tiny_run_config(model_dirs["llama"], data_file, tmp_path / "run", max_steps=1)
    raw["generate"]["num_samples"] = 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(config)], capture_output=True, text=True,
                          env={**subprocess_env(), CPU_BF16_ENV: forced, "COLUMNS": "300"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reason = f"forced by {CPU_BF16_ENV}={forced}"
    assert f"precision: {dtype} on cpu ({reason})" in done.stdout + done.stderr  # the run header, before training
    assert summary_precision(tmp_path / "run") == {"device": "cpu", "dtype": dtype, "reason": reason}
    weights = load_file(str(tmp_path / "run/adapter/adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # trained weights stay fp32 in either precision


def test_train_command_refuses_an_invalid_override(model_dirs, data_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(model_dirs["llama"], data_file, tmp_path / "run", max_steps=1)))
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(config)], capture_output=True, text=True,
                          env={**subprocess_env(), CPU_BF16_ENV: "yes"}, timeout=300)
    assert done.returncode == 2 and f"{CPU_BF16_ENV}='yes': use 1" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("method", "precision", "expected"), [
    ("full", "auto", {"dtype": "fp32", "reason": f"fp32 master weights for full fine-tuning (bf16 otherwise: forced by {CPU_BF16_ENV}=1)"}),
    ("lora", "fp32", {"dtype": "fp32", "reason": "precision: fp32 in config"}),
])
def test_summary_names_config_and_full_fine_tuning_choices(model_dirs, data_file, tmp_path, monkeypatch, method, precision, expected):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    raw = tiny_run_config(model_dirs["llama"], data_file, tmp_path / "run", max_steps=1, precision=precision)
    raw["method"], raw["generate"]["num_samples"] = method, 0
    result = run_training(config_from_dict(raw))
    assert result.precision == summary_precision(tmp_path / "run") == {"device": "cpu", **expected}


@pytest.mark.parametrize(("capability", "native"), [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_cuda_auto_needs_native_bf16(monkeypatch, capability, native):
    """Pre-Ampere GPUs emulate bf16 (torch.cuda.is_bf16_supported() says yes there by default): auto picks fp32."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    dtype, reason = choose_dtype("auto", torch.device("cuda"))
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert reason.startswith(f"CUDA device Test GPU (compute capability {capability[0]}.{capability[1]})")
