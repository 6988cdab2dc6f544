"""Pick the compute dtype of a run, and say why.

`precision: auto` means bf16 where the device computes it natively, else fp32: a CUDA device of
compute capability 8.0+ (or ROCm); a CPU whose flags list AMX-BF16 or AVX512-BF16 (on an AVX2-only
CPU bf16 is emulated, ~100x slower than fp32). `PEFTKIT_CPU_BF16=1` (or `0`) overrides the CPU
detection, so tests and CI can exercise both outcomes on any host.

Example (on an AVX2-only CPU):
    >>> dtype, reason = choose_dtype("auto", torch.device("cpu"))
    >>> dtype_name(dtype), reason
    ('fp32', 'CPU has no native bf16 (AVX2 only)')
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ConfigError

CPU_BF16_ENV = "PEFTKIT_CPU_BF16"
"""Environment variable overriding CPU bf16 detection: 1 = native bf16, 0 = none; unset = read the CPU flags."""

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name configs use for a dtype (`fp32`, `bf16`, `fp16`)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_bf16_forced() -> bool | None:
    """The `PEFTKIT_CPU_BF16` override: True / False, or None when unset or empty."""
    value = os.environ.get(CPU_BF16_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ConfigError(f"{CPU_BF16_ENV}={value!r}: use 1 (treat the CPU as bf16-native), 0 (fp32), or unset it to read the CPU flags")
    return value == "1"


def cpu_bf16(flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """(native bf16?, why) for this CPU: the override first, then the flags."""
    forced = cpu_bf16_forced()
    if forced is not None:
        return forced, f"forced by {CPU_BF16_ENV}={int(forced)}"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return True, "CPU reports AMX-BF16"
    if "avx512_bf16" in flags:
        return True, "CPU reports AVX512-BF16"
    if not flags:
        return False, "CPU flags unreadable (no /proc/cpuinfo flags), assuming no native bf16"
    simd = "AVX-512 without BF16" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    return False, f"CPU has no native bf16 ({simd})"


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), or when `PEFTKIT_CPU_BF16=1`."""
    return cpu_bf16()[0]


def choose_dtype(precision: str, device: torch.device, full_finetune: bool = False) -> tuple[torch.dtype, str]:
    """(dtype, reason) for `precision` (auto | bf16 | fp32) on `device`.

    Full fine-tuning trains the weights themselves, so it keeps them in fp32 whatever precision
    says: bf16 weights (8 mantissa bits) would round small updates away.

    Example:
        >>> choose_dtype("fp32", torch.device("cpu"))
        (torch.float32, 'precision: fp32 in config')
    """
    if precision in ("fp32", "bf16"):
        dtype, reason = (torch.float32 if precision == "fp32" else torch.bfloat16), f"precision: {precision} in config"
    elif precision == "auto":
        native, why = _device_bf16(device)
        dtype, reason = (torch.bfloat16 if native else torch.float32), why
    else:
        raise ConfigError(f"precision {precision!r}: use auto, bf16 or fp32")
    if full_finetune and dtype != torch.float32:
        return torch.float32, f"fp32 master weights for full fine-tuning ({dtype_name(dtype)} otherwise: {reason})"
    return dtype, reason


def _device_bf16(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        return cuda_bf16(device)
    if device.type == "cpu":
        return cpu_bf16()
    return False, f"device {device.type}: bf16 not assumed"


def cuda_bf16(device: torch.device) -> tuple[bool, str]:
    """(native bf16?, why) for a CUDA device: compute capability 8.0+ (Ampere and later), or ROCm.

    Not `torch.cuda.is_bf16_supported()`: by default it also says yes where bf16 is only emulated (pre-Ampere).
    """
    name = torch.cuda.get_device_name(device)
    if torch.version.hip:
        return True, f"ROCm device {name} computes bf16"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return True, f"CUDA device {name} (compute capability {major}.{minor}) computes bf16 natively"
    return False, f"CUDA device {name} (compute capability {major}.{minor}) has no native bf16"


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of `choose_dtype` without the reason: auto = bf16 where the device computes it natively, else fp32."""
    return choose_dtype(precision, device)[0]


def describe(dtype: torch.dtype, reason: str, device: torch.device) -> dict[str, str]:
    """What the run header and `summary.json` report: {"device", "dtype", "reason"}."""
    return {"device": str(device), "dtype": dtype_name(dtype), "reason": reason}
