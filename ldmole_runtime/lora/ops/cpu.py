"""The CPU backend: the whole sparse mixture of one set's tokens in one C call (kernels/cpu/ldmole_cpu.c).

Only the matmuls that BLAS does best (λ hidden layer, router logits) stay in torch; λ, routing and
the active experts' LoRA run fused, writing into y. Where the kernel does not apply (not fp32,
autograd, unusual strides, no C compiler), the torch reference computes the same numbers.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from ldmole_kernels.cpu_kernels import cpu_kernels, ptr
from ldmole_kernels.router_kinds import CPU_KERNEL_KINDS
from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank, GroupBank, SetSlot
from ldmole_runtime.lora.ops import torch_ref
from ldmole_runtime.lora.routing import SPARSEGEN_EPS
from ldmole_runtime.paths import default_cache_dir


class CpuBackend:
    name = "cpu"

    def warm_up(self, bank: AdapterBank) -> None:
        _library()  # builds (once per machine) and loads the C kernel

    def apply(self, y: torch.Tensor, x: torch.Tensor, bank: AdapterBank, gb: GroupBank, batch: AdapterBatch,
              capture=None, dropout: float = 0.0) -> None:
        for seg in batch.segments:
            slot = bank.at(seg.set_index)
            if gb.group not in slot.group_masks:
                continue
            if dropout == 0.0 and kernel_applies(y, x, seg, slot, gb):
                fused_segment(y, x, seg, slot, gb, capture)
            else:
                torch_ref.apply_segment(y, x, slot, gb, seg, capture, dropout)


@functools.cache
def _library():
    return cpu_kernels(default_cache_dir() / "kernels")


def kernel_applies(y, x, seg, slot: SetSlot, gb: GroupBank) -> bool:
    return (_library() is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous() and y.is_contiguous() and not torch.is_grad_enabled()
            and slot.num_experts <= 64 and gb.A.shape[2] <= 256 and slot.kernel_kind in CPU_KERNEL_KINDS
            and (seg.index is None or seg.index.dtype == torch.int64))


def fused_segment(y: torch.Tensor, x: torch.Tensor, seg, slot: SetSlot, gb: GroupBank, capture) -> None:
    lib = _library()
    E, P, n = slot.num_experts, len(gb.projections), seg.num_tokens
    xs = x if seg.index is None else x[seg.index]
    router = slot.router
    hid = w2 = None
    b2 = 0.0
    if router.needs_lambda:
        w1, b1, w2, _ = slot.lambda_nets[gb.fan_in]
        hid = torch.addmm(b1, xs, w1.T)
        b2 = slot.lambda_out_bias[gb.fan_in]
    logits = xs @ gb.router[slot.offset:slot.offset + E].reshape(E * P, gb.fan_in).T if router.needs_logits else None
    p_out = x.new_empty(n, P, E)
    lambdas_out = x.new_full((n,), float("nan")) if capture is not None else None
    mask = slot.group_masks[gb.group]
    B_ptrs, outs, cols = _kernel_layout(gb)
    lib.ldmole_group_decode(
        n, ptr(seg.index), x.data_ptr(), x.shape[1], gb.fan_in,
        ptr(hid), 0 if hid is None else hid.shape[1], ptr(w2), b2, SPARSEGEN_EPS,
        ptr(logits), slot.kernel_kind, E, P,
        gb.A.data_ptr(), gb.A.shape[2], slot.rank, B_ptrs, gb.A.shape[0], slot.offset,
        outs, cols, ptr(mask), slot.scaling,
        y.data_ptr(), y.shape[1], p_out.data_ptr(), ptr(lambdas_out))
    if capture is not None:
        torch_ref.record(capture, slot, gb, seg.index, p_out, lambdas_out if router.needs_lambda else None)


def _kernel_layout(gb: GroupBank) -> tuple:
    """The group's B pointers, widths and column offsets as C arrays, rebuilt only when the bank
    restacks (a new B tensor has a new address): this runs 120 times per decode step."""
    key = tuple(b.data_ptr() for b in gb.B)
    if gb.kernel_cache is None or gb.kernel_cache[0] != key:
        P = len(gb.B)
        gb.kernel_cache = (key, ((ctypes.c_void_p * P)(*key), (ctypes.c_int * P)(*gb.fan_outs),
                                 (ctypes.c_int * P)(*(s.start for s in gb.column_slices))))
    return gb.kernel_cache[1]
