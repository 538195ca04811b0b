"""The torch reference of the mixture, and the oracle of every other backend.

    y[:, cols_i] += (alpha / r) * Σ_e p[t, i, e] * B_i,e (A_i,e x_t)

Routing runs once per (adapter set present, group): λ once for the shared input, router logits for
every projection of the group in one matmul. The experts are then computed rank-stacked: one matmul
of width E·r per set, weighted by p, so an expert with p = 0 adds exact zeros. That is the path
autograd trains, and the "dense" alternative to the sparse kernels: no data-dependent shapes, so no
host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldmole_kernels.router_kinds import RouterKind
from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank, GroupBank, SetSlot
from ldmole_runtime.lora.routing import ROUTERS, lambda_from_mlp, threshold_from_layer


def route(slot: SetSlot, set_index: int, gb: GroupBank, xs: torch.Tensor):
    """Expert weights p [n, P, E] (fp32), the router's per-token scalar (a Sparsegen router's λ [n],
    AdaMoLE's thresholds [n, P]; None for other routers) and router logits u [n, P, E] for the tokens
    xs of one set."""
    E, P = slot.num_experts, len(gb.projections)
    router = slot.router
    scalar = None
    if router.needs_lambda:
        scalar = lambda_from_mlp(xs, *slot.lambda_nets[gb.fan_in])
    elif router.needs_threshold:
        scalar = threshold_from_layer(xs, gb.threshold[set_index], gb.threshold_bias[set_index], slot.threshold_cap)
    if router.needs_logits:
        weights = gb.router[slot.offset:slot.offset + E].reshape(E * P, gb.fan_in)
        if xs.dtype != torch.float32:  # bf16/fp16 activations: logits summed in fp32 and kept unrounded, since
            xs, weights = xs.float(), weights.float()  # sparsegen's support is decided on them (as the λ's)
        u = (xs @ weights.T).view(-1, E, P).transpose(1, 2)
    else:
        u = xs.new_zeros(xs.shape[0], P, 1)
    per_projection = None if scalar is None else (scalar[..., None] if router.needs_threshold else scalar[:, None])
    p = router.route(u, per_projection, **slot.router_options)
    mask = slot.group_masks[gb.group]
    return (p if mask is None else p * mask), scalar, u


def record(capture, slot: SetSlot, gb: GroupBank, index, p, scalar, u=None) -> None:
    """Hands a sink the routing of each projection the set adapts (a masked one's p is all zero);
    `scalar` is what route() returns: λ [n], or AdaMoLE's thresholds [n, P]."""
    for i in slot.adapted[gb.group]:
        kw = {}
        if slot.router.needs_lambda:
            kw["lam"] = scalar
        elif slot.router.needs_threshold:
            kw["threshold"] = scalar[:, i]
        capture.record(f"{gb.layer}.{gb.projections[i]}", index, p[:, i], u=None if u is None else u[:, i], **kw)


def expert_delta(y: torch.Tensor, xs: torch.Tensor, index, slot: SetSlot, gb: GroupBank, p: torch.Tensor) -> None:
    """Every expert of the set, weighted by p (zeros included), as the reference training code."""
    E, P, r = slot.num_experts, len(gb.projections), gb.A.shape[2]
    A = gb.A[slot.offset:slot.offset + E].reshape(E * P * r, gb.fan_in)
    h = (xs @ A.T).view(-1, E, P, r) * (p.transpose(1, 2) * slot.scaling).to(xs.dtype)[..., None]
    for i, cols in enumerate(gb.column_slices):
        B = gb.B[i][slot.offset:slot.offset + E].reshape(E * r, gb.fan_outs[i])
        delta = h[:, :, i].reshape(-1, E * r) @ B
        if index is None:
            y[:, cols] += delta
        else:
            y[:, cols].index_add_(0, index, delta)


def apply_segment(y, x, slot: SetSlot, gb: GroupBank, seg, capture=None, dropout: float = 0.0) -> None:
    xs = x if seg.index is None else x[seg.index]
    if dropout > 0.0:
        xs = F.dropout(xs, dropout, training=True)
    p, scalar, u = route(slot, seg.set_index, gb, xs)
    if capture is not None:
        record(capture, slot, gb, seg.index, p, scalar, u)
    expert_delta(y, xs, seg.index, slot, gb, p)


class TorchRefBackend:
    """Per set present: route, then the rank-stacked experts. Differentiable (training runs it)."""
    name = "torch"

    def warm_up(self, bank: AdapterBank) -> None:
        pass  # nothing is compiled

    def apply(self, y: torch.Tensor, x: torch.Tensor, bank: AdapterBank, gb: GroupBank, batch: AdapterBatch,
              capture=None, dropout: float = 0.0) -> None:
        """Add the adapters' delta of one group to the fused base output y [N, Σ out] in place.

        `dropout` (training) drops the input of the adapters only (A, router and λ-network), as the
        reference code does; the base projection has already seen the clean x."""
        for seg in batch.segments:
            slot = bank.at(seg.set_index)
            if gb.group in slot.group_masks:
                apply_segment(y, x, slot, gb, seg, capture, dropout)


def route_blocks_reference(x, sorted_tokens, blocks, set_info, masks, router, lambdas, thresholds, max_experts, eps,
                           block_m=None, scalar_out=None):
    """The Triton routing kernel's contract (ldmole_kernels.triton.routing.route_blocks) in torch,
    through the runtime's routers (routing.py: the LD-MoLE and AdaMoLE contracts)."""
    N, P = x.shape[0], router.shape[1]
    p = torch.zeros(N, P, max_experts, dtype=torch.float32)
    for s, start, end in blocks.tolist():
        if s < 0 or not masks[s].any():  # bare-base tokens, or a set adapting none of the group
            continue
        offset, E, kind, top_k, _rank = set_info[s].tolist()
        rows = sorted_tokens[start:end]
        xs = x[rows].float()
        name = RouterKind(kind).name.lower()
        u = (xs @ router[offset:offset + E].reshape(E * P, -1).float().T).view(-1, E, P).transpose(1, 2)
        scalar = None
        if name == "sparsegen":
            w1, b1, w2, b2 = (t[s] for t in lambdas)
            lam = lambda_from_mlp(xs, w1, b1, w2[None], b2[None], eps)
            scalar = lam[:, None]
            if scalar_out is not None:
                scalar_out[rows] = lam[:, None]
        elif name == "threshold":
            weight, bias, cap = thresholds
            t = threshold_from_layer(xs, weight[s], bias[s], float(cap[s]))
            scalar = t[..., None]
            if scalar_out is not None:
                scalar_out[rows] = t
        options = {"k": top_k} if name == "topk" else {}
        p[rows, :, :E] = ROUTERS[name].route(u, scalar, eps=eps, **options) * masks[s][:, None]
    return p
