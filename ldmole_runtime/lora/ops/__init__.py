"""The mixture's compute behind one contract, several backends; one is chosen per engine.

    ops.apply(y, x, bank, group_bank, adapter_batch, capture=None, dropout=0.0)

adds the adapters' delta of one projection group to the fused base output y [N, Σ out], in place.
The model's layers do not call it directly: a forward binds the bank, the step's metadata, the
routing sink and the dropout once (step.LoraStep), and a layer calls `apply(y, x, group)`.

* `torch`: the reference and oracle (routing per set, experts rank-stacked, differentiable);
* `cpu`: the fused C kernel, one call per set present; skips experts with p = 0;
* `triton`: GPU kernels (routing epilogue, sparse shrink/expand) over all sets in one launch each;
  runs on CPU under Triton's interpreter (`TRITON_INTERPRET=1`), for tests.

Modes name a backend by intent: `dense` is the torch reference, `sparse` the fastest sparse
backend for the device (cpu on CPU, triton on CUDA).
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING, Protocol

import torch

from ldmole_runtime.errors import LDMoleError

if TYPE_CHECKING:
    from ldmole_runtime.lora.adapter_batch import AdapterBatch
    from ldmole_runtime.lora.bank import AdapterBank, GroupBank
    from ldmole_runtime.lora.capture import RoutingSink


class LoraOps(Protocol):
    """The contract every backend keeps (see the module docstring)."""
    name: str

    def apply(self, y: torch.Tensor, x: torch.Tensor, bank: AdapterBank, gb: GroupBank, batch: AdapterBatch,
              capture: RoutingSink | None = None, dropout: float = 0.0) -> None: ...


BACKENDS = ("torch", "cpu", "triton")
MODES = ("sparse", "dense") + BACKENDS


def triton_usable(device: torch.device) -> bool:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def lora_ops(mode: str, device: torch.device | str = "cpu") -> LoraOps:
    """The backend object for a mode or backend name on this device."""
    device = torch.device(device)
    if mode not in MODES:
        raise LDMoleError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "sparse":
        mode = "cpu" if device.type == "cpu" else ("triton" if triton_usable(device) else "torch")
    elif mode == "dense":
        mode = "torch"
    if mode == "cpu" and device.type != "cpu":
        raise LDMoleError(f"the cpu backend runs on the CPU; the model is on {device}")
    if mode == "triton" and not triton_usable(device):
        raise LDMoleError("the triton backend needs a CUDA device with triton installed "
                          "(or TRITON_INTERPRET=1: Triton's slow CPU interpreter, for tests)")
    return _instance(mode)


@cache
def _instance(name: str):
    if name == "torch":
        from ldmole_runtime.lora.ops.torch_ref import TorchRefOps
        return TorchRefOps()
    if name == "cpu":
        from ldmole_runtime.lora.ops.cpu import CpuOps
        return CpuOps()
    from ldmole_runtime.lora.ops.triton import TritonOps
    return TritonOps()
