"""The LD-MoLE delta of one projection group: route every token, then add Σ_e p_e·B_e·A_e·x.

    y[:, cols_i] += (alpha / r) * Σ_e p[t, i, e] * B_i,e (A_i,e x_t)

Routing runs once per (adapter set present, group): λ once for the shared input, router logits
for every projection of the group in one matmul. Two ways to compute the experts:

* `dense`: every expert of the set, as the training code does (and the path autograd trains).
* `sparse`: only (token, expert) pairs with p > 0, grouped by global expert across all sets; see
  `sparse_expert_delta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ctypes

import torch
import torch.nn.functional as F

from ldmole_kernels.cpu_kernels import cpu_kernels, ptr

from ..routing import SPARSEGEN_EPS, lambda_from_mlp
from .adapter_batch import AdapterBatch
from .bank import AdapterBank, GroupBank, SetSlot

MODES = ("sparse", "dense")


@dataclass
class RoutingCapture:
    """Optional per-forward record of routing, for `ldmole forward` and reports."""
    num_tokens: int
    num_experts: int
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # "{layer}.{proj}" -> [N, E]
    lambdas: dict[str, torch.Tensor] = field(default_factory=dict)  # "{layer}.{proj}" -> [N]

    def record(self, key: str, index, p: torch.Tensor, lam: torch.Tensor | None, u: torch.Tensor | None = None) -> None:
        if key not in self.routing:
            self.routing[key] = torch.zeros(self.num_tokens, self.num_experts, device=p.device)
            self.lambdas[key] = torch.full((self.num_tokens,), float("nan"), device=p.device)
        rows = slice(None) if index is None else index
        self.routing[key][rows, :p.shape[-1]] = p
        if lam is not None:
            self.lambdas[key][rows] = lam


def route(slot: SetSlot, gb: GroupBank, xs: torch.Tensor):
    """Expert weights p [n, P, E] (fp32), λ [n] (or None) and router logits u [n, P, E] for the
    tokens xs of one set."""
    E, P = slot.num_experts, len(gb.projections)
    router = slot.router
    lam = lambda_from_mlp(xs, *slot.lambda_nets[gb.fan_in]) if router.needs_lambda else None
    if router.needs_logits:
        weights = gb.router[slot.offset:slot.offset + E].reshape(E * P, gb.fan_in)
        u = (xs @ weights.T).view(-1, E, P).transpose(1, 2)
    else:
        u = xs.new_zeros(xs.shape[0], P, 1)
    p = router.route(u, None if lam is None else lam[:, None], **slot.router_options)
    mask = slot.group_masks[gb.group]
    return (p if mask is None else p * mask), lam, u


def _add_rows(y: torch.Tensor, cols: slice, index, delta: torch.Tensor) -> None:
    if index is None:
        y[:, cols] += delta
    else:
        y[:, cols].index_add_(0, index, delta)


def dense_delta(y: torch.Tensor, xs: torch.Tensor, index, slot: SetSlot, gb: GroupBank, p: torch.Tensor) -> None:
    """Every expert of the set, weighted by p (zeros included), as the reference training code."""
    E, P, r = slot.num_experts, len(gb.projections), gb.A.shape[2]
    A = gb.A[slot.offset:slot.offset + E].reshape(E * P * r, gb.fan_in)
    h = (xs @ A.T).view(-1, E, P, r) * (p.transpose(1, 2) * slot.scaling).to(xs.dtype)[..., None]
    for i, cols in enumerate(gb.column_slices):
        B = gb.B[i][slot.offset:slot.offset + E].reshape(E * r, gb.fan_outs[i])
        _add_rows(y, cols, index, h[:, :, i].reshape(-1, E * r) @ B)


# Up to this many (token, expert) pairs, each pair gathers its own A and B and one batched matmul
# does them all (few kernel launches: what decode on a GPU wants); beyond, the weights a gather
# would copy outgrow the work, and pairs are grouped per expert instead.
GATHER_MAX_PAIRS = 2048


def sparse_expert_delta(y: torch.Tensor, x: torch.Tensor, gb: GroupBank, token: torch.Tensor,
                        expert: torch.Tensor, proj: torch.Tensor, weight: torch.Tensor) -> None:
    """Torch reference of the sparse dispatch: y[t, cols_i] += w · B_i[g] (A[g, i] x_t) per pair.

    Pairs are (token, global expert g, projection i, weight); only experts with p > 0 appear.
    """
    if token.numel() <= GATHER_MAX_PAIRS:
        gathered_expert_delta(y, x, gb, token, expert, proj, weight)
    else:
        grouped_expert_delta(y, x, gb, token, expert, proj, weight)


def gathered_expert_delta(y, x, gb: GroupBank, token, expert, proj, weight) -> None:
    """Every pair with its own gathered A [r, in] and B [r, out]: batched matmuls, no per-expert loop."""
    P = len(gb.projections)
    order = torch.argsort(proj, stable=True)
    token, expert, proj, weight = token[order], expert[order], proj[order], weight[order].to(x.dtype)
    A = gb.A[expert, proj]  # [M, r, in]
    h = torch.bmm(A, x[token].unsqueeze(-1)).squeeze(-1) * weight[:, None]  # [M, r]
    counts = torch.bincount(proj, minlength=P).tolist()
    start = 0
    for i, (n, cols) in enumerate(zip(counts, gb.column_slices)):
        if n:
            part = slice(start, start + n)
            out = torch.bmm(h[part].unsqueeze(1), gb.B[i][expert[part]]).squeeze(1)  # [n, out_i]
            delta = y.new_zeros(y.shape[0], gb.fan_outs[i]).index_add_(0, token[part], out)
            y[:, cols] += delta
        start += n


def grouped_expert_delta(y, x, gb: GroupBank, token, expert, proj, weight) -> None:
    """Pairs grouped by (g, i), i.e. by adapter set and expert: one pair of matmuls per group."""
    P = len(gb.projections)
    key = expert * P + proj
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=gb.A.shape[0] * P).tolist()
    A = gb.A.reshape(-1, *gb.A.shape[2:])  # [G * P, r, in]
    deltas: list[torch.Tensor | None] = [None] * P  # contiguous accumulators: index_add_ into y's column views is slow
    tokens, weights = token[order].split(counts), weight[order].to(x.dtype).split(counts)
    for k, (t, w) in enumerate(zip(tokens, weights)):
        if t.numel() == 0:
            continue
        g, i = divmod(k, P)
        if deltas[i] is None:
            deltas[i] = y.new_zeros(y.shape[0], gb.fan_outs[i])
        h = (x[t] @ A[k].T) * w[:, None]
        deltas[i].index_add_(0, t, h @ gb.B[i][g])
    for delta, cols in zip(deltas, gb.column_slices):
        if delta is not None:
            y[:, cols] += delta


def fused_cpu_segment(y: torch.Tensor, x: torch.Tensor, seg, slot: SetSlot, gb: GroupBank,
                      capture: RoutingCapture | None) -> bool:
    """The whole sparse mixture of one set's few tokens in one C call (kernels/cpu/ldmole_cpu.c).

    Only the matmuls that BLAS does best (λ hidden layer, router logits) stay in torch; λ, routing
    and the active experts' LoRA run fused, writing into y. Returns False when the kernel does not
    apply (GPU, not fp32, autograd, unusual strides), and the torch path runs instead.
    """
    lib = cpu_kernels() if _use_cpu_kernel(y, x, seg, slot, gb) else None
    if lib is None:
        return False
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
    lam_out = x.new_full((n,), float("nan")) if capture is not None else None
    mask = slot.group_masks[gb.group]
    B_ptrs, outs, cols = _kernel_layout(gb)
    lib.ldmole_group_decode(
        n, ptr(seg.index), x.data_ptr(), x.shape[1], gb.fan_in,
        ptr(hid), 0 if hid is None else hid.shape[1], ptr(w2), b2, SPARSEGEN_EPS,
        ptr(logits), KERNEL_ROUTER[slot.router_kind], E, P,
        gb.A.data_ptr(), gb.A.shape[2], slot.rank, B_ptrs, gb.A.shape[0], slot.offset,
        outs, cols, ptr(mask), slot.scaling,
        y.data_ptr(), y.shape[1], p_out.data_ptr(), ptr(lam_out))
    if capture is not None:
        for i in slot.adapted[gb.group]:
            capture.record(f"{gb.layer}.{gb.projections[i]}", seg.index, p_out[:, i],
                           lam_out if router.needs_lambda else None)
    return True


# Measured on 2 cores (SmolLM2 shape, E=8 r=8): the kernel beats the grouped torch path at 8, 128
# and 512 tokens per set, so on CPU it takes every size; tests lower this to exercise the torch path.
CPU_KERNEL_MAX_TOKENS = 1 << 20


def _kernel_layout(gb: GroupBank) -> tuple:
    """The group's B pointers, widths and column offsets as C arrays, rebuilt only when the bank
    restacks (a new B tensor has a new address): this runs 120 times per decode step."""
    key = tuple(b.data_ptr() for b in gb.B)
    if gb.kernel_cache is None or gb.kernel_cache[0] != key:
        P = len(gb.B)
        gb.kernel_cache = (key, ((ctypes.c_void_p * P)(*key), (ctypes.c_int * P)(*gb.fan_outs),
                                 (ctypes.c_int * P)(*(s.start for s in gb.column_slices))))
    return gb.kernel_cache[1]
KERNEL_ROUTER = {"sparsegen": 0, "softmax": 1, "none": 2}


def _use_cpu_kernel(y, x, seg, slot: SetSlot, gb: GroupBank) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and seg.num_tokens <= CPU_KERNEL_MAX_TOKENS
            and x.is_contiguous() and y.is_contiguous() and not torch.is_grad_enabled()
            and slot.num_experts <= 64 and gb.A.shape[2] <= 256 and slot.router_kind in KERNEL_ROUTER
            and (seg.index is None or seg.index.dtype == torch.int64))


def apply_group(y: torch.Tensor, x: torch.Tensor, bank: AdapterBank, gb: GroupBank, batch: AdapterBatch,
                mode: str = "sparse", capture=None, dropout: float = 0.0) -> None:
    """Add the adapters' delta of one group to the fused base output y [N, Σ out] in place.

    `dropout` (training) drops the input of the adapters only (A, router and λ-network), as the
    reference code does; the base projection has already seen the clean x."""
    pairs = []
    for seg in batch.segments:
        slot = bank.slots[seg.set_index]
        if gb.group not in slot.group_masks:
            continue
        if mode == "sparse" and dropout == 0.0 and fused_cpu_segment(y, x, seg, slot, gb, capture):
            continue
        xs = x if seg.index is None else x[seg.index]
        if dropout > 0.0:
            xs = F.dropout(xs, dropout, training=True)
        p, lam, u = route(slot, gb, xs)
        if capture is not None:
            for i in slot.adapted[gb.group]:
                capture.record(f"{gb.layer}.{gb.projections[i]}", seg.index, p[:, i], lam, u[:, i])
        if mode == "dense":
            dense_delta(y, xs, seg.index, slot, gb, p)
        else:
            t, i, e = torch.nonzero(p, as_tuple=True)
            pairs.append(((t if seg.index is None else seg.index[t]), e + slot.offset, i, p[t, i, e] * slot.scaling))
    if pairs:
        token, expert, proj, weight = (torch.cat(parts) for parts in zip(*pairs))
        sparse_expert_delta(y, x, gb, token, expert, proj, weight)
