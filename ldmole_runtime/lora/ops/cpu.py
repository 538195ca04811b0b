"""The CPU backend: the sparse mixture in C (kernels/cpu/ldmole_cpu.c), two ways.

* A step's few-token sets (decode: one or two tokens each; in bf16, sets of up to 16 tokens) all go
  through one call per projection group, `ldmole_group_units`: the call reads each set's facts
  from the bank's tables by slot, as the Triton kernels do, routes the tokens itself and shares the
  work out among the threads.
* A set with many tokens (prefill, scoring) gets a call of its own, after oneDNN has computed its
  λ hidden layer (and, in fp32, its router logits): the matmuls it does best.

The kernel takes fp32 or bf16. Routing is fp32 in both, as in the torch reference: λ and the
router logits are fp32 sums, the latter of the bank's bf16 router rows in a bf16 engine. In bf16,
the λ-network's first layer multiplies by bf16 copies of its weights (dpbf16 in the unit call,
oneDNN for large sets, which also rounds that layer's output to bf16). Where the kernel does not
apply (fp16, autograd, unusual strides, no C compiler), the torch reference computes the same
numbers.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from ldmole_kernels.cpu_kernels import GroupTables, cpu_kernels, ptr
from ldmole_kernels.router_kinds import CPU_KERNEL_KINDS
from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank, GroupBank, SetSlot
from ldmole_runtime.lora.ops import torch_ref
from ldmole_runtime.lora.routing import SPARSEGEN_EPS
from ldmole_runtime.paths import default_cache_dir

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the C kernel's two element types
# In a bf16 engine, a set too large for the unit call (prefill, scoring) gets the λ-network's hidden
# layer from a bf16 matmul (oneDNN, AMX where present; fp32 sums, output rounded to bf16) rather
# than fp32 BLAS: for 576 -> 256 on this project's 2-core CPU, 32 tokens 27 µs against 39 in fp32,
# 256 tokens 64 against 189. Active sets against an fp32 engine, default adapter, 4,435 SocialIQA
# tokens: 98.42% of decisions equal through this path, 98.56% through the unit call, against 98.58%
# with this layer in fp32.
UNIT_TOKENS = 4  # tokens per unit of ldmole_group_units (its UNIT_TOKENS)
# Which sets of a step the unit call mixes. fp32: sets of up to 4 tokens (decode). bf16: sets of up
# to UNIT_SET_TOKENS_BF16 tokens, cut into units of UNIT_TOKENS, since there the λ-network's first
# layer runs in C on dpbf16 from bf16 copies (lambda_hidden_bf16), shared among the threads;
# larger sets (prefill, scoring) are left to oneDNN's matmul in fused_segment.
UNIT_SET_TOKENS_FP32 = 4
UNIT_SET_TOKENS_BF16 = 16
MAX_PROJECTIONS = 3  # the widest group (q/k/v): the C kernel's MAX_P


class CpuBackend:
    name = "cpu"

    def warm_up(self, bank: AdapterBank) -> None:
        _library()  # builds (once per machine) and loads the C kernel

    def apply(self, y: torch.Tensor, x: torch.Tensor, bank: AdapterBank, gb: GroupBank, batch: AdapterBatch,
              capture=None, dropout: float = 0.0) -> None:
        mixed = frozenset()
        kernel = dropout == 0.0 and group_applies(y, x, gb)
        if kernel:
            plan = unit_plan(bank, batch)
            if plan.count:
                mix_units(y, x, bank, gb, batch, plan, capture)
                mixed = plan.sets
        for seg in batch.segments:
            if seg.set_index in mixed:
                continue
            slot = bank.at(seg.set_index)
            if gb.group not in slot.group_masks:
                continue
            if kernel and segment_applies(seg, slot):
                fused_segment(y, x, seg, slot, gb, capture)
            else:
                torch_ref.apply_segment(y, x, slot, gb, seg, capture, dropout)


@functools.cache
def _library():
    return cpu_kernels(default_cache_dir() / "kernels")


def group_applies(y, x, gb: GroupBank) -> bool:
    """What the kernel needs of the tensors (the same for every set of the step)."""
    return (x.is_cpu and x.dtype in _KERNEL_DTYPES and y.dtype == x.dtype == gb.A.dtype
            and x.is_contiguous() and y.is_contiguous() and not torch.is_grad_enabled()
            and gb.A.shape[2] <= 256 and len(gb.projections) <= MAX_PROJECTIONS and _library() is not None)


def slot_applies(slot: SetSlot) -> bool:
    return slot.num_experts <= 64 and slot.kernel_kind in CPU_KERNEL_KINDS


def segment_applies(seg, slot: SetSlot) -> bool:
    return slot_applies(slot) and (seg.index is None or seg.index.dtype == torch.int64)


def kernel_applies(y, x, seg, slot: SetSlot, gb: GroupBank) -> bool:
    return group_applies(y, x, gb) and segment_applies(seg, slot)


# ---- every few-token set of a step in one call --------------------------------------------------------

@dataclass(frozen=True)
class UnitPlan:
    """A step's few-token sets as the C kernel's unit table, worked out once per step (not per layer)."""
    count: int
    units: ctypes.Array | None  # [count, 3] int32: slot, first position in the step's sorted rows, tokens
    rows: torch.Tensor | None  # the step's token rows, set by set (None: position = row)
    rows_ptr: int | None = None  # their address
    segments: tuple[tuple, ...] = ()  # (segment, first position) of each set the units cover
    sets: frozenset = frozenset()
    lambda_bf16: dict | None = None  # fan-in -> per-slot pointers to bf16 λ first layers (a bf16 bank)


def unit_plan(bank: AdapterBank, batch: AdapterBatch) -> UnitPlan:
    plan = batch.scratch.get("cpu_units")
    if plan is None:
        plan = batch.scratch["cpu_units"] = _plan(bank, batch)
    return plan


def _plan(bank: AdapterBank, batch: AdapterBatch) -> UnitPlan:
    rows = batch.sorted_tokens
    if rows is None and not (len(batch.segments) == 1 and batch.segments[0].index is None):
        return UnitPlan(0, None, None)
    bf16 = bank.dtype == torch.bfloat16
    most = UNIT_SET_TOKENS_BF16 if bf16 else UNIT_SET_TOKENS_FP32
    chosen, position = [], 0
    for seg in batch.segments:  # stored set by set in sorted_tokens, in this order
        if seg.num_tokens <= most and slot_applies(bank.at(seg.set_index)):
            chosen.append((seg, position))
        position += seg.num_tokens
    if rows is not None and rows.dtype != torch.int64:
        return UnitPlan(0, None, None)
    flat = [v for seg, start in chosen for first in range(0, seg.num_tokens, UNIT_TOKENS)
            for v in (seg.set_index, start + first, min(UNIT_TOKENS, seg.num_tokens - first))]
    slots = [bank.at(seg.set_index) for seg, _ in chosen]
    return UnitPlan(len(flat) // 3, (ctypes.c_int32 * len(flat))(*flat), rows, ptr(rows), tuple(chosen),
                    frozenset(seg.set_index for seg, _ in chosen), _lambda_bf16(bank, slots) if bf16 else None)


def _lambda_bf16(bank: AdapterBank, slots: list[SetSlot]) -> dict:
    """For each λ width, a C array of per-slot pointers to the bf16 copies of the step's sets' first
    λ layers (made once per load: _bf16_lambda_layer)."""
    arrays = {}
    for width in bank.kernel_tables().lambdas:
        pointers = (ctypes.c_void_p * bank.capacity)()
        for slot in slots:
            if slot.router.needs_lambda and width in slot.lambda_nets:
                w1, b1 = slot.lambda_nets[width][:2]
                pointers[slot.index] = _bf16_lambda_layer(slot, width, w1, b1)[1].data_ptr()
        arrays[width] = pointers
    return arrays


def mix_units(y: torch.Tensor, x: torch.Tensor, bank: AdapterBank, gb: GroupBank, batch: AdapterBatch,
              plan: UnitPlan, capture) -> None:
    tables, tables_ref = _group_tables(bank, gb)
    p_out = lam_out = None
    if capture is not None:
        P, emax = tables.P, tables.emax
        m = batch.num_tokens if plan.rows is None else plan.rows.shape[0]
        p_out = batch.scratch_buffer("cpu_units_p", m * P * emax, x.device)[:m * P * emax].view(m, P, emax)
        lam_out = torch.full((m,), float("nan"))
    _library().ldmole_group_units(
        tables_ref, plan.count, plan.units, plan.rows_ptr, x.data_ptr(), x.shape[1],
        y.data_ptr(), y.shape[1], ptr(p_out), ptr(lam_out),
        None if plan.lambda_bf16 is None else plan.lambda_bf16.get(gb.fan_in))
    if capture is not None:
        for seg, start in plan.segments:
            slot = bank.at(seg.set_index)
            if gb.group in slot.group_masks:
                span = slice(start, start + seg.num_tokens)
                torch_ref.record(capture, slot, gb, seg.index, p_out[span, :, :slot.num_experts],
                                 lam_out[span] if slot.router.needs_lambda else None)


# ---- one set's many tokens -------------------------------------------------------------------------

def fused_segment(y: torch.Tensor, x: torch.Tensor, seg, slot: SetSlot, gb: GroupBank, capture) -> None:
    """The λ hidden layer from one matmul (oneDNN), the rest in C. In fp32 the router logits come
    from a BLAS matmul too; in bf16 the C entry sums them from the bank's bf16 router rows."""
    n, E, P = seg.num_tokens, slot.num_experts, len(gb.projections)
    xsel = x if seg.index is None else x[seg.index]
    bf16 = x.dtype == torch.bfloat16
    router = slot.router
    hid = w2 = logits = None
    b2 = 0.0
    if router.needs_lambda:
        w1, b1, w2, _ = slot.lambda_nets[gb.fan_in]
        if bf16:
            b1_bf16, w1_bf16 = _bf16_lambda_layer(slot, gb.fan_in, w1, b1)
            hid = torch.addmm(b1_bf16, xsel, w1_bf16.T).float()
        else:
            hid = torch.addmm(b1, xsel.float(), w1.T)
        b2 = slot.lambda_out_bias[gb.fan_in]
    if router.needs_logits and not bf16:
        logits = xsel @ gb.router[slot.offset:slot.offset + E].reshape(E * P, gb.fan_in).T
    p_out = x.new_empty(n, P, E, dtype=torch.float32)
    lambdas_out = x.new_full((n,), float("nan"), dtype=torch.float32) if capture is not None else None
    B_ptrs, outs, cols = _kernel_layout(gb)
    lib = _library()
    args = (n, ptr(seg.index), x.data_ptr(), x.shape[1], gb.fan_in,
            ptr(hid), 0 if hid is None else hid.shape[1], ptr(w2), b2, SPARSEGEN_EPS,
            ptr(logits), slot.kernel_kind, E, P,
            gb.A.data_ptr(), gb.A.shape[2], slot.rank, B_ptrs, gb.A.shape[0], slot.offset,
            outs, cols, ptr(slot.group_masks[gb.group]), slot.scaling,
            y.data_ptr(), y.shape[1], p_out.data_ptr(), ptr(lambdas_out))
    if bf16:
        lib.ldmole_group_decode_bf16(*args, gb.router.data_ptr() if router.needs_logits else None)
    else:
        lib.ldmole_group_decode(*args)
    if capture is not None:
        torch_ref.record(capture, slot, gb, seg.index, p_out, lambdas_out if router.needs_lambda else None)


def _bf16_lambda_layer(slot: SetSlot, fan_in: int, w1: torch.Tensor, b1: torch.Tensor) -> tuple:
    """bf16 copies of the λ-network's first layer, made once per load (the bank empties the cache when
    a load or training rewrites the fp32 rows)."""
    key = (w1.data_ptr(), b1.data_ptr())
    cached = slot.kernel_copies.get(fan_in)
    if cached is None or cached[0] != key:
        cached = slot.kernel_copies[fan_in] = (key, b1.detach().bfloat16(), w1.detach().bfloat16())
    return cached[1], cached[2]


def _group_tables(bank: AdapterBank, gb: GroupBank) -> tuple[GroupTables, object]:
    """The unit call's GroupTables of this group and a reference to pass it by, built again only when
    the bank is laid out again (new tables) or training swaps the group's tensors (new objects): a
    hit costs no tensor op."""
    tables = bank.kernel_tables()
    cached = gb.units_cache
    if (cached is not None and cached[0] is tables and cached[1] is gb.A and cached[2] is gb.router
            and cached[3] is gb.B):
        return cached[4]
    B_ptrs, outs, cols = _kernel_layout(gb)
    w1, b1, w2, b2 = tables.lambdas.get(gb.fan_in, (None,) * 4)
    g = GroupTables(bf=int(gb.A.dtype == torch.bfloat16), fan_in=gb.fan_in, H=0 if w1 is None else w1.shape[1],
                    r_max=gb.A.shape[2], P=len(gb.projections), emax=tables.max_experts, eps=SPARSEGEN_EPS,
                    set_info=tables.set_info.data_ptr(), scaling=tables.scaling.data_ptr(),
                    mask=tables.masks[gb.group].data_ptr(), w1=ptr(w1), b1=ptr(b1), w2=ptr(w2), b2=ptr(b2),
                    router=gb.router.data_ptr(), A=gb.A.data_ptr(), B=ctypes.addressof(B_ptrs),
                    outs=ctypes.addressof(outs), cols=ctypes.addressof(cols))
    # g points into B_ptrs, outs and cols: the cache holds them as long as g
    gb.units_cache = (tables, gb.A, gb.router, gb.B, (g, ctypes.byref(g)), B_ptrs, outs, cols)
    return gb.units_cache[4]


def _kernel_layout(gb: GroupBank) -> tuple:
    """The group's B pointers, widths and column offsets as C arrays, rebuilt only when the bank
    restacks (a new B tensor has a new address): this runs 120 times per decode step."""
    key = tuple(b.data_ptr() for b in gb.B)
    if gb.kernel_cache is None or gb.kernel_cache[0] != key:
        P = len(gb.B)
        gb.kernel_cache = (key, ((ctypes.c_void_p * P)(*key), (ctypes.c_int * P)(*gb.fan_outs),
                                 (ctypes.c_int * P)(*(s.start for s in gb.column_slices))))
    return gb.kernel_cache[1]
