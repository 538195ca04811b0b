"""Build and load the CPU kernels (plain C + OpenMP, called through ctypes).

The shared library is compiled once per machine into the caller's cache folder, keyed by the
source and the CPU, because it is built with -march=native. Without a C compiler the
runtime falls back to the torch path, which computes the same numbers.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu") / "ldmole_cpu.c"
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _build(cache_dir: Path) -> ctypes.CDLL:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + _cpu_id().encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"ldmole_cpu-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11",
                            str(SOURCE), "-o", str(tmp_out), "-lm"], check=True, capture_output=True)
            os.replace(tmp_out, out)  # atomic: a concurrent build never sees half a library
    lib = ctypes.CDLL(str(out))
    p, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.ldmole_group_decode.restype = None
    lib.ldmole_group_decode.argtypes = [
        i32, p, p, i32, i32,  # n, rows, x, x_stride, in
        p, i32, p, f32, f32,  # hid, h, w2, b2, eps
        p, i32, i32, i32,  # logits, kind, E, P
        p, i32, i32, p, i32, i32,  # A, r_max, r, B, G, g_offset
        p, p, p, f32,  # outs, cols, mask, scale
        p, i32, p, p,  # y, y_stride, p (scratch and output), lam_out
    ]
    return lib


def cpu_kernels(cache_dir: Path) -> ctypes.CDLL | None:
    """The loaded library (built into cache_dir on first use), or None when it cannot be built here
    (then the torch path is used)."""
    global _lib, _failed
    if _lib is None and _failed is None:
        if os.environ.get("LDMOLE_DISABLE_CPU_KERNELS") == "1":
            _failed = "disabled by LDMOLE_DISABLE_CPU_KERNELS=1"
        else:
            try:
                _lib = _build(cache_dir)
            except (OSError, subprocess.CalledProcessError) as exc:
                _failed = str(exc)
    return _lib


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
