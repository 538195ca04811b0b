"""Build and load the CPU kernels (plain C + OpenMP, called through ctypes).

The shared library is compiled once per machine into the caller's cache folder, keyed by the
source, the CPU and the flags, because it is built with -march=native: on a CPU with AVX512-BF16
its bf16 entry point uses dpbf16. LDMOLE_NO_BF16=1 builds the portable bf16 path instead, as on a
CPU without the instruction (and makes `--dtype auto` pick fp32: ldmole_runtime/dtypes.py).
Without a C compiler the runtime falls back to the torch path, which computes the same numbers.
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

CPU_DIR = Path(__file__).with_name("cpu")
SOURCES = (CPU_DIR / "ldmole_cpu.c", CPU_DIR / "units.c", CPU_DIR / "paged_decode.c")  # one library
HEADERS = (CPU_DIR / "common.h", CPU_DIR / "routing.h")
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def _cpu_id() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def no_bf16() -> bool:
    """LDMOLE_NO_BF16=1: behave as on a CPU without bf16 dot products."""
    return os.environ.get("LDMOLE_NO_BF16") == "1"


def _build(cache_dir: Path, portable_bf16: bool = False) -> ctypes.CDLL:
    source = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    flags = ["-DLDMOLE_PORTABLE_BF16"] if portable_bf16 else []
    key = hashlib.sha256(source + _cpu_id().encode() + " ".join(flags).encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"ldmole_cpu-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", *flags,
                            *map(str, SOURCES), "-o", str(tmp_out), "-lm"], check=True, capture_output=True)
            os.replace(tmp_out, out)  # atomic: a concurrent build never sees half a library
    lib = ctypes.CDLL(str(out))
    p, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    experts = [
        p, i32, i32, p, i32, i32,  # A, r_max, r, B, G, g_offset
        p, p, p, f32,  # outs, cols, mask, scale
        p, i32, p, p,  # y, y_stride, p (scratch and output), lam_out
    ]
    lib.ldmole_group_decode.restype = None
    lib.ldmole_group_decode.argtypes = [
        i32, p, p, i32, i32,  # n, rows, x, x_stride, in
        p, i32, p, f32, f32,  # hid, h, w2, b2, eps
        p, i32, i32, i32,  # logits, kind, E, P
        *experts]
    lib.ldmole_group_decode_bf16.restype = None
    lib.ldmole_group_decode_bf16.argtypes = [*lib.ldmole_group_decode.argtypes, p]  # + bf16 router rows
    lib.ldmole_group_units.restype = None
    lib.ldmole_group_units.argtypes = [
        p, i32, p, p,  # GroupTables *, number of units, units, rows
        p, i32, p, i32,  # x, x_stride, y, y_stride
        p, p, p]  # p_out, lam_out, per-slot bf16 λ first layers
    lib.ldmole_paged_decode.restype = None
    lib.ldmole_paged_decode.argtypes = [
        i32, i32, p, p, i32, i32,  # bf16?, B, rows, q, H, D
        p, p, i32, i32,  # k_cache, v_cache, block_size, H_kv
        p, i32, p, f32, p]  # tables, width, ctx_lens, scale, out
    lib.ldmole_max_unit_tokens.restype = i32
    lib.ldmole_max_unit_tokens.argtypes = []
    lib.ldmole_has_dpbf16.restype = i32
    lib.ldmole_has_dpbf16.argtypes = []
    return lib


class GroupTables(ctypes.Structure):
    """ldmole_cpu.c's GroupTables (cpu/units.c): what a unit call reads of one projection group and the bank."""
    _fields_ = [(name, ctypes.c_int32) for name in ("bf", "fan_in", "H", "r_max", "P", "emax")] + [
        ("eps", ctypes.c_float), ("unused", ctypes.c_int32)] + [
        (name, ctypes.c_void_p) for name in ("set_info", "scaling", "mask", "w1", "b1", "w2", "b2",
                                             "router", "A", "B", "outs", "cols")]


def cpu_kernels(cache_dir: Path) -> ctypes.CDLL | None:
    """The loaded library (built into cache_dir on first use), or None when it cannot be built here
    (then the torch path is used)."""
    global _lib, _failed
    if _lib is None and _failed is None:
        if os.environ.get("LDMOLE_DISABLE_CPU_KERNELS") == "1":
            _failed = "disabled by LDMOLE_DISABLE_CPU_KERNELS=1"
        else:
            try:
                _lib = _build(cache_dir, portable_bf16=no_bf16())
            except (OSError, subprocess.CalledProcessError) as exc:
                _failed = str(exc)
    return _lib


def build_variant(cache_dir: Path, portable_bf16: bool) -> ctypes.CDLL:
    """One build of the library, whatever the environment says (tests compare the two bf16 paths)."""
    return _build(cache_dir, portable_bf16)


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
