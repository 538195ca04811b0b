"""The LoRA backend: the mixture's compute behind one contract; one backend is chosen per engine.

    backend.apply(y, x, bank, group_bank, adapter_batch, capture=None, dropout=0.0)

adds the adapters' delta of one projection group to the fused base output y [N, Σ out], in place.
The model's layers do not call it directly: a forward binds the bank, the step's metadata, the
routing sink and the dropout once (step.LoraStep), and a layer calls `apply(y, x, group)`.

* `torch`: the reference and oracle (routing per set, experts rank-stacked, differentiable);
* `cpu`: the fused C kernel, one call per set present; skips experts with p = 0;
* `triton`: GPU kernels (routing epilogue, sparse shrink/expand) over all sets in one launch each;
  runs on CPU under Triton's interpreter (`TRITON_INTERPRET=1`), for tests.

Two more names pick a backend by intent: `dense` is the torch reference, `sparse` the fastest
sparse backend for the device (cpu on CPU, triton on CUDA). The one setting is called
`lora_backend` everywhere: `EngineConfig`, `LLM`, `LDMoleRuntime.forward`, `lm_eval`'s model_args
and the `--lora-backend` flag (`mode` is still accepted as an older spelling).
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


class LoraBackend(Protocol):
    """The contract every backend keeps (see the module docstring)."""
    name: str

    def apply(self, y: torch.Tensor, x: torch.Tensor, bank: AdapterBank, gb: GroupBank, batch: AdapterBatch,
              capture: RoutingSink | None = None, dropout: float = 0.0) -> None: ...

    def warm_up(self, bank: AdapterBank) -> None:
        """Compile now whatever the bank's steps will launch (called at start-up and after every load
        or unload, between steps), so that no step waits on a compiler."""


LORA_BACKENDS = ("sparse", "dense", "torch", "cpu", "triton")


def triton_usable(device: torch.device) -> bool:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_lora_backend(name: str, device: torch.device | str = "cpu") -> LoraBackend:
    """The backend object for one of LORA_BACKENDS on this device."""
    device = torch.device(device)
    if name not in LORA_BACKENDS:
        raise LDMoleError(f"unknown lora_backend {name!r}; choose one of {LORA_BACKENDS}")
    if name == "sparse":
        name = "cpu" if device.type == "cpu" else ("triton" if triton_usable(device) else "torch")
    elif name == "dense":
        name = "torch"
    if name == "cpu" and device.type != "cpu":
        raise LDMoleError(f"the cpu backend runs on the CPU; the model is on {device}")
    if name == "triton" and not triton_usable(device):
        raise LDMoleError("the triton backend needs a CUDA device with triton installed "
                          "(or TRITON_INTERPRET=1: Triton's slow CPU interpreter, for tests)")
    return _instance(name)


def lora_backend_setting(lora_backend: str | None, mode: str | None, default: str = "sparse") -> str:
    """`lora_backend`, or `mode`, its older spelling (still accepted where users could pass it)."""
    if mode is not None and lora_backend is not None and mode != lora_backend:
        raise LDMoleError(f"lora_backend={lora_backend!r} and mode={mode!r} disagree: mode is the older "
                          "name of the same setting; pass lora_backend only")
    return lora_backend or mode or default


@cache
def _instance(name: str):
    if name == "torch":
        from ldmole_runtime.lora.ops.torch_ref import TorchRefBackend
        return TorchRefBackend()
    if name == "cpu":
        from ldmole_runtime.lora.ops.cpu import CpuBackend
        return CpuBackend()
    from ldmole_runtime.lora.ops.triton import TritonBackend
    return TritonBackend()
