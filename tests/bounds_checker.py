"""A memory checker for Triton kernels run in the interpreter, in the spirit of compute-sanitizer's
memcheck: every load and store a kernel makes (its mask on) must fall inside one of the tensors
passed to that launch, within the tensor's own span (not merely its storage).

The interpreter reads raw addresses and never checks them, so a kernel that reads past a buffer
usually "works" on CPU and faults, or reads garbage, on a GPU. This hooks the interpreter's two
memory primitives for the duration of a `with bounds_checked():` block and records every access
outside the launch's tensors; the block raises at exit if there was one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from triton.runtime import interpreter


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] a strided tensor may touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True) if size > 0)
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _tensors(arg):
    if isinstance(arg, torch.Tensor):
        yield arg
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            yield from _tensors(a)


@dataclass
class Violations:
    launches: int = 0
    accesses: int = 0
    bad: list[str] = field(default_factory=list)
    loaded: dict[str, int] = field(default_factory=dict)  # watched tensor -> elements loaded from it
    multiply_adds: int = 0  # of every tl.dot: M·N·K


class OutOfBounds(AssertionError):
    pass


@contextlib.contextmanager
def bounds_checked(watch: dict[str, torch.Tensor] | None = None):
    """Every interpreted launch inside the block is checked; raises OutOfBounds at exit on a violation.
    Also counts, for the work a kernel does, the elements loaded from each `watch` tensor and the
    multiply-adds of its dots."""
    found = Violations()
    watched = {name: _span(t) for name, t in (watch or {}).items()}
    found.loaded = dict.fromkeys(watched, 0)
    spans: list[tuple[int, int]] = []
    init_args = interpreter.GridExecutor._init_args_hst
    masked_load = interpreter.InterpreterBuilder.create_masked_load
    masked_store = interpreter.InterpreterBuilder.create_masked_store
    dot = interpreter.InterpreterBuilder.create_dot

    def record_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        spans.clear()
        spans.extend(_span(t) for a in (*args_hst, *kwargs_hst.values()) for t in _tensors(a))
        found.launches += 1
        return args_hst, kwargs_hst

    def check(kind, ptrs, mask, itemsize):
        addresses = np.asarray(ptrs.data, dtype=np.uint64).reshape(-1)
        on = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)
        addresses = addresses[on]
        found.accesses += addresses.size
        if addresses.size == 0:
            return
        if kind == "load":
            for name, (lo, hi) in watched.items():
                found.loaded[name] += int(((addresses >= lo) & (addresses < hi)).sum())
        inside = np.zeros(addresses.size, dtype=bool)
        for lo, hi in spans:
            inside |= (addresses >= lo) & (addresses + itemsize <= hi)
        if not inside.all():
            outside = addresses[~inside][:4].tolist()
            near = [min(spans, key=lambda s, a=a: min(abs(a - s[0]), abs(a - s[1]))) for a in outside]
            found.bad.append(f"{kind} of {int((~inside).sum())} element(s) outside every argument of launch "
                             f"{found.launches}: addresses {outside}, nearest argument spans {near}")

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask, np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask, np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return masked_store(self, ptrs, value, mask, cache_policy)

    def count_dot(self, a, b, d, *args):
        m, k = np.shape(a.data)[-2:]
        found.multiply_adds += m * k * np.shape(b.data)[-1]
        return dot(self, a, b, d, *args)

    interpreter.GridExecutor._init_args_hst = record_args
    interpreter.InterpreterBuilder.create_dot = count_dot
    interpreter.InterpreterBuilder.create_masked_load = load
    interpreter.InterpreterBuilder.create_masked_store = store
    try:
        yield found
    finally:
        interpreter.GridExecutor._init_args_hst = init_args
        interpreter.InterpreterBuilder.create_masked_load = masked_load
        interpreter.InterpreterBuilder.create_masked_store = masked_store
        interpreter.InterpreterBuilder.create_dot = dot
    if found.bad:
        raise OutOfBounds("\n".join(found.bad[:8]))
