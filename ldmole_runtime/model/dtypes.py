"""The engine's dtype, and what `auto` picks.

`auto` (the default of `ldmole serve`, `ldmole bench` and `lm_eval --model ldmole`) picks bf16 on a
CPU with bf16 dot products (AVX512-BF16 or AMX), where both the base's matmuls and the C kernel run
twice as fast as in fp32; bf16 on a GPU that has it, else fp16; and fp32 everywhere else.
LDMOLE_NO_BF16=1 makes a CPU count as one without bf16 (tests, and a way out if a CPU misreports).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldmole_kernels.cpu_kernels import no_bf16
from ldmole_runtime.errors import LDMoleError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def cpu_bf16_support() -> str | None:
    """The bf16 dot-product instructions this CPU reports (None: none, or LDMOLE_NO_BF16=1)."""
    if no_bf16():
        return None
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):  # not Linux: ask torch
        return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else None
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return "+".join(found) or None


def auto_dtype(device: str | torch.device = "cpu") -> tuple[str, str]:
    """(dtype name, why) for `--dtype auto` on this device."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU computes in bf16"
        return "float16", "the GPU has no bf16"
    if device.type == "cpu":
        support = cpu_bf16_support()
        if support:
            return "bfloat16", f"this CPU has {support}"
        why = "LDMOLE_NO_BF16=1" if no_bf16() else "this CPU has no bf16 dot products"
        return "float32", why
    return "float32", f"no bf16 rule for {device.type}"


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = auto_dtype(device)[0]
    if dtype not in DTYPES:
        raise LDMoleError(f"unknown dtype {dtype!r}; choose one of {list(DTYPE_CHOICES)}")
    return DTYPES[dtype]
