"""The CPU backend: the whole sparse mixture of one set's tokens in one C call (kernels/cpu/ldmole_cpu.c).

Only the matmuls that BLAS does best (λ hidden layer, router logits) stay in torch; λ, routing and
the active experts' LoRA run fused, writing into y. The kernel takes fp32 or bf16; in bf16, routing
stays fp32 as in the torch reference (the λ-network is fp32, the logits are summed in fp32 from the
bf16 router rows), and a decode step's tokens are routed inside the kernel. Where it does not
apply (fp16, autograd, unusual strides, no C compiler), the torch reference computes the same
numbers.
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


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the C kernel's two entry points
# bf16: up to this many tokens of a set (a decode step's), the kernel routes them itself; more (prefill,
# scoring) take the λ hidden layer and the logits from one fp32 BLAS matmul each
ROUTE_IN_KERNEL_MAX_TOKENS = 4


@functools.cache
def _library():
    return cpu_kernels(default_cache_dir() / "kernels")


def kernel_applies(y, x, seg, slot: SetSlot, gb: GroupBank) -> bool:
    return (_library() is not None and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
            and y.dtype == x.dtype == gb.A.dtype and x.is_contiguous() and y.is_contiguous()
            and not torch.is_grad_enabled()
            and slot.num_experts <= 64 and gb.A.shape[2] <= 256 and slot.kernel_kind in CPU_KERNEL_KINDS
            and (seg.index is None or seg.index.dtype == torch.int64))


def fused_segment(y: torch.Tensor, x: torch.Tensor, seg, slot: SetSlot, gb: GroupBank, capture) -> None:
    n = seg.num_tokens
    if x.dtype == torch.bfloat16:
        _segment_bf16(y, x, seg, slot, gb, capture)
        return
    E, P = slot.num_experts, len(gb.projections)
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
    B_ptrs, outs, cols = _kernel_layout(gb)
    _library().ldmole_group_decode(
        n, ptr(seg.index), x.data_ptr(), x.shape[1], gb.fan_in,
        ptr(hid), 0 if hid is None else hid.shape[1], ptr(w2), b2, SPARSEGEN_EPS,
        ptr(logits), slot.kernel_kind, E, P,
        gb.A.data_ptr(), gb.A.shape[2], slot.rank, B_ptrs, gb.A.shape[0], slot.offset,
        outs, cols, ptr(slot.group_masks[gb.group]), slot.scaling,
        y.data_ptr(), y.shape[1], p_out.data_ptr(), ptr(lambdas_out))
    if capture is not None:
        torch_ref.record(capture, slot, gb, seg.index, p_out, lambdas_out if router.needs_lambda else None)


def _segment_bf16(y: torch.Tensor, x: torch.Tensor, seg, slot: SetSlot, gb: GroupBank, capture) -> None:
    """bf16 activations and weights; routing in fp32 (the λ-network's own dtype, and logits summed in
    fp32 from the bf16 router rows, as torch_ref.route does). A few tokens are routed inside the
    kernel; for many, the λ hidden layer and the logits are one BLAS matmul each."""
    E, P, n = slot.num_experts, len(gb.projections), seg.num_tokens
    router = slot.router
    w1 = b1 = w2 = hid = logits = None
    b2 = 0.0
    if router.needs_lambda:
        w1, b1, w2, _ = slot.lambda_nets[gb.fan_in]
        b2 = slot.lambda_out_bias[gb.fan_in]
    if n > ROUTE_IN_KERNEL_MAX_TOKENS:
        xs = (x if seg.index is None else x[seg.index]).float()
        if router.needs_lambda:
            hid = torch.addmm(b1, xs, w1.T)
        if router.needs_logits:
            logits = xs @ gb.router[slot.offset:slot.offset + E].reshape(E * P, gb.fan_in).float().T
    p_out = x.new_empty(n, P, E, dtype=torch.float32)
    lambdas_out = x.new_full((n,), float("nan"), dtype=torch.float32) if capture is not None else None
    B_ptrs, outs, cols = _kernel_layout(gb)
    _library().ldmole_group_decode_bf16(
        n, ptr(seg.index), x.data_ptr(), x.shape[1], gb.fan_in,
        ptr(hid), ptr(w1), ptr(b1), 0 if w1 is None else w1.shape[0], ptr(w2), b2, SPARSEGEN_EPS,
        ptr(logits), gb.router.data_ptr(), slot.kernel_kind, E, P,
        gb.A.data_ptr(), gb.A.shape[2], slot.rank, B_ptrs, gb.A.shape[0], slot.offset,
        outs, cols, ptr(slot.group_masks[gb.group]), slot.scaling,
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
