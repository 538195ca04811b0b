"""Counts what a forward asks of the device: aten ops, kernel launches, and device→host syncs.

A `TorchDispatchMode` sees every aten op. The ops listed in `SYNC_OPS` need a value or a shape that
only the device knows, so on a GPU each one stalls the host until the device catches up (and
breaks CUDA-graph capture); on CPU they are counted the same way, which is how CI proves a decode
step has none. Triton launches and calls into the C kernel are invisible to the mode, so
`count_triton_launches` and `count_cpu_kernel_calls` wrap the project's kernels and count each launch
or call as one op (pausing the mode while Triton's interpreter moves the arguments around).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique2,
            aten.unique_dim, aten.bincount, aten.is_nonzero, aten.equal, aten.histc, aten.allclose}


# ops that only allocate or re-describe memory: no device work is launched for them
ALLOCATING_OPS = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided}


class OpCounter(TorchDispatchMode):
    """`ops`: every aten op and Triton launch; `launches`: those that put work on the device (not views,
    not bare allocations); `allocations`: the bare allocations."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.allocations, self.syncs, self.paused = 0, 0, 0, [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            self.ops += 1
            self.allocations += func.overloadpacket in ALLOCATING_OPS
            self.launches += not (func.is_view or func.overloadpacket in ALLOCATING_OPS)
            if func.overloadpacket in SYNC_OPS or _is_sync(func, args, kwargs):
                self.syncs.append(str(func))
        return func(*args, **kwargs)


def _is_sync(func, args, kwargs) -> bool:
    if func is aten.repeat_interleave.Tensor:  # the output size is data-dependent unless given
        return kwargs.get("output_size") is None
    if func.overloadpacket in (aten._to_copy, aten.copy_):  # device → host copies
        src = args[1] if func.overloadpacket is aten.copy_ else args[0]
        dst_cpu = (args[0].device.type == "cpu") if func.overloadpacket is aten.copy_ else \
            (kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu")
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_cpu
    return False


@contextmanager
def count_triton_launches(monkeypatch, counter_ref: list):
    """While active, each launch of the project's Triton kernels adds one op to counter_ref[0]."""
    from ldmole_kernels.triton import routing, shrink_expand

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                counter = counter_ref[0]
                if counter is None:
                    return launch(*args, **kwargs)
                counter.ops += 1
                counter.launches += 1
                counter.paused = True
                try:
                    return launch(*args, **kwargs)
                finally:
                    counter.paused = False
            return run

    for module, name in ((routing, "_route_gemm_kernel"), (routing, "_route_epilogue_kernel"),
                         (shrink_expand, "_shrink_kernel"),
                         (shrink_expand, "_expand_kernel")):
        monkeypatch.setattr(module, name, Counted(getattr(module, name)))
    yield


@contextmanager
def count_cpu_kernel_calls(monkeypatch, counter_ref: list):
    """While active, each call into the C kernel's library adds one op and one launch to counter_ref[0]."""
    from ldmole_runtime.lora.ops import cpu

    lib = cpu._library()

    class Counted:
        def __getattr__(self, name):
            entry = getattr(lib, name)

            def call(*args):
                counter = counter_ref[0]
                if counter is not None:
                    counter.ops += 1
                    counter.launches += 1
                return entry(*args)
            return call

    monkeypatch.setattr(cpu, "_library", lambda: Counted())
    yield
