"""`precision: auto` and the PEFTKIT_CPU_BF16 override: what is chosen, and the reason given."""

from __future__ import annotations

import pytest
import torch

from peftkit.errors import ConfigError
from peftkit.precision import CPU_BF16_ENV, choose_dtype, cpu_bf16, cpu_supports_bf16, resolve_dtype

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
