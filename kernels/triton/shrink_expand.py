"""The active experts' LoRA of every adapted token of a step: shrink, then expand. Torch reference below.

    shrink:  h[t, i, e] = (alpha/r) · p[t, i, e] · A[set_t + e, i] x_t          [N, P, E_max, r_max] fp32
    expand:  y[t, cols_i] += Σ_e h[t, i, e] · B_i[set_t + e]

Both run over the step's block table (at most BLOCK_M tokens of one set per program). Shrink has
one program per (block, projection, expert) and returns at once when no token of the block gives
that expert p > 0: inactive experts cost no weight reads and no FLOPs. Expand has one program per
(block, column tile of one projection): q/k/v (or gate/up) are one launch ("multi-slice"); it
loops over the set's experts, skipping the same inactive ones, and owns its output tile, so it
adds into y without atomics and the result does not depend on scheduling (reproducible scores).
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from ldmole_kernels.triton.routing import CHUNK, RoutingPlan, route_projection, scalar_rows


@triton.jit
def _shrink_kernel(x_ptr, stride_x, tokens_ptr, blocks_ptr, set_info_ptr, scaling_ptr, p_ptr, a_ptr, h_ptr,
                   work_ptr, mask_ptr, b2_ptr, thr_b_ptr, cap_ptr, scalar_ptr, eps,
                   IN, R, P: tl.constexpr, EMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, ROUTE: tl.constexpr, EP: tl.constexpr,
                   NH: tl.constexpr, WORK: tl.constexpr, HAS_LAMBDA: tl.constexpr, STORE_SCALAR: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1) // EMAX
    e = tl.program_id(1) % EMAX
    s = tl.load(blocks_ptr + 3 * b)
    if s >= 0:
        start = tl.load(blocks_ptr + 3 * b + 1)
        end = tl.load(blocks_ptr + 3 * b + 2)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
        in_set = rows < tl.where(e < tl.load(set_info_ptr + 5 * s + 1), end, 0)  # expert e exists in the set
        if ROUTE:  # the router of projection i, from the routing GEMMs' work rows; this program keeps expert e
            if e < tl.load(set_info_ptr + 5 * s + 1):
                p_i, scalar = route_projection(work_ptr, tok, row_ok, s, i, set_info_ptr, mask_ptr, b2_ptr,
                                               thr_b_ptr, cap_ptr, eps, P, EP, NH, WORK, BLOCK_M, HAS_LAMBDA)
                w = tl.sum(tl.where(tl.arange(0, CHUNK)[None, :] == e, p_i, 0.0), axis=1)
                tl.store(p_ptr + tok * (P * EMAX) + i * EMAX + e, w, mask=in_set)  # for expand and captures
                if STORE_SCALAR:
                    if e == 0:
                        tl.store(scalar_ptr + tok * P + i, scalar,
                                 mask=scalar_rows(rows, end, s, set_info_ptr, mask_ptr, P))
            else:
                w = tl.zeros((BLOCK_M,), dtype=tl.float32)
        else:
            w = tl.load(p_ptr + tok * (P * EMAX) + i * EMAX + e, mask=in_set, other=0.0)
        if tl.max(w, axis=0) > 0.0:
            g = tl.load(set_info_ptr + 5 * s) + e
            rank = tl.load(set_info_ptr + 5 * s + 4)  # the set's own rank: the bank's wider rows are padding
            scale = w * tl.load(scaling_ptr + s)
            for r0 in range(0, rank, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                r_ok = rs < rank
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(0, IN, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < IN
                    xk = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :],
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    a = tl.load(a_ptr + ((g * P + i) * R + rs[:, None]) * IN + ks[None, :],
                                mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    if UPCAST:
                        acc += tl.dot(xk.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="ieee")
                    else:
                        acc += tl.dot(xk, tl.trans(a))
                tl.store(h_ptr + ((tok[:, None] * P + i) * EMAX + e) * R + rs[None, :], acc * scale[:, None],
                         mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(y_ptr, stride_y, tokens_ptr, blocks_ptr, set_info_ptr, p_ptr, h_ptr, b0_ptr, b1_ptr, b2_ptr,
                   R, W0, W1, W2, C0, C1, C2, P: tl.constexpr, EMAX: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    s = tl.load(blocks_ptr + 3 * b)
    if s >= 0:
        # which projection this column tile belongs to: tiles of slice 0, then 1, then 2
        T0 = tl.cdiv(W0, BLOCK_N)
        T1 = tl.cdiv(W1, BLOCK_N)
        in1 = tile >= T0
        in2 = tile >= T0 + T1
        i = in1.to(tl.int32) + in2.to(tl.int32)
        n0 = (tile - tl.where(in2, T0 + T1, tl.where(in1, T0, 0))) * BLOCK_N
        width = tl.where(in2, W2, tl.where(in1, W1, W0))
        col0 = tl.where(in2, C2, tl.where(in1, C1, C0))
        b_ptr = tl.where(in2, b2_ptr, tl.where(in1, b1_ptr, b0_ptr))
        start = tl.load(blocks_ptr + 3 * b + 1)
        end = tl.load(blocks_ptr + 3 * b + 2)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
        offset = tl.load(set_info_ptr + 5 * s)
        E = tl.load(set_info_ptr + 5 * s + 1)
        rank = tl.load(set_info_ptr + 5 * s + 4)  # the set's own rank: the bank's wider rows are padding
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < width
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(0, E):
            w = tl.load(p_ptr + tok * (P * EMAX) + i * EMAX + e, mask=row_ok, other=0.0)
            if tl.max(w, axis=0) > 0.0:
                for r0 in range(0, rank, BLOCK_R):
                    rs = r0 + tl.arange(0, BLOCK_R)
                    r_ok = rs < rank
                    h = tl.load(h_ptr + ((tok[:, None] * P + i) * EMAX + e) * R + rs[None, :],
                                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                    bm = tl.load(b_ptr + ((offset + e) * R + rs[:, None]) * width + ns[None, :],
                                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                    if UPCAST:
                        acc += tl.dot(h, bm.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(h.to(bm.dtype), bm)
        out = y_ptr + tok[:, None] * stride_y + col0 + ns[None, :]
        ok = row_ok[:, None] & n_ok[None, :]
        y = tl.load(out, mask=ok, other=0.0)
        tl.store(out, (y.to(tl.float32) + acc).to(y.dtype), mask=ok)


# rank rows per dot: each set runs ceil(rank / 16) of them, so a rank-8 set in a bank that also holds
# a rank-64 set does the work it would do alone (tl.dot's smallest tile is 16)
RANK_CHUNK = 16




def shrink_expand(y: torch.Tensor, x: torch.Tensor, p: torch.Tensor, sorted_tokens: torch.Tensor,
                  blocks: torch.Tensor, set_info: torch.Tensor, scaling: torch.Tensor, A: torch.Tensor,
                  Bs: list[torch.Tensor], block_m: int, block_n: int = 64, cols: tuple[int, ...] | None = None,
                  h_out: torch.Tensor | None = None, routing: tuple | None = None) -> None:
    """y [N, Σ out] += the experts' delta, for the tokens in `blocks`. A [G, P, r, in], Bs[i] [G, r, out_i];
    projection i's columns of y start at cols[i] (default: side by side from column 0).

    `routing` (work rows from routing.route_logits, masks, b2, threshold biases, τmax, eps, the
    RoutingPlan, scalar_out or None): the shrink kernel first runs the routing epilogue and writes
    p (which must then be an uninitialised [N, P, E_max] buffer); without it, p is given."""
    N, IN = x.shape
    _, P, R, _ = A.shape
    EMAX = p.shape[-1]
    assert len(Bs) == P <= 3 and A.is_contiguous() and all(b.is_contiguous() for b in Bs)
    assert x.stride(1) == 1 and y.stride(1) == 1 and p.is_contiguous()
    upcast = x.dtype == torch.float32 or _interpreted()
    numel = N * P * EMAX * R  # h_out: a flat fp32 buffer to hold h (a step's scratch, reused by every group)
    h = torch.empty(numel, device=x.device, dtype=torch.float32) if h_out is None else h_out[:numel]
    h = h.view(N, P, EMAX, R)
    grid = (blocks.shape[0], P * EMAX)
    if routing is None:  # p is given: the routing arguments are never read
        work = masks = b2 = thr_b = cap = scalars = p
        eps, plan, store_scalar = 0.0, RoutingPlan(P, EMAX, None), False
    else:
        work, masks, b2, thr_b, cap, eps, plan, scalar_out = routing
        store_scalar = scalar_out is not None
        scalars = scalar_out if store_scalar else p
    _shrink_kernel[grid](x, x.stride(0), sorted_tokens, blocks, set_info, scaling, p, A, h,
                         work, masks, b2, thr_b, cap, scalars, eps, IN, R,
                         P=P, EMAX=EMAX, BLOCK_M=block_m, BLOCK_R=RANK_CHUNK, BLOCK_K=32, UPCAST=upcast,
                         ROUTE=routing is not None, EP=plan.EP, NH=plan.NH, WORK=plan.WORK,
                         HAS_LAMBDA=plan.has_lambda, STORE_SCALAR=store_scalar)
    widths = [b.shape[2] for b in Bs] + [0] * (3 - P)
    starts = list(cols) if cols is not None else [sum(widths[:i]) for i in range(P)]
    starts += [0] * (3 - P)
    ptrs = list(Bs) + [Bs[0]] * (3 - P)
    tiles = sum(triton.cdiv(w, block_n) for w in widths)
    _expand_kernel[(blocks.shape[0], tiles)](
        y, y.stride(0), sorted_tokens, blocks, set_info, p, h, *ptrs, R, *widths, *starts, P=P, EMAX=EMAX,
        BLOCK_M=block_m, BLOCK_R=RANK_CHUNK, BLOCK_N=block_n,
        UPCAST=upcast)


def shrink_expand_reference(y, x, p, sorted_tokens, blocks, set_info, scaling, A, Bs, block_m=None, block_n=None,
                            cols=None):
    """The same contract in torch: every expert of each block's set, weighted by p (zeros add zeros)."""
    P = A.shape[1]
    starts = list(cols) if cols is not None else torch.tensor([0] + [b.shape[2] for b in Bs]).cumsum(0).tolist()
    bounds = [(starts[i], starts[i] + Bs[i].shape[2]) for i in range(P)]
    for s, start, end in blocks.tolist():
        if s < 0:
            continue
        offset, E = set_info[s, :2].tolist()
        rows = sorted_tokens[start:end]
        xs = x[rows].float()
        for i in range(P):
            h = torch.einsum("nk,erk->ner", xs, A[offset:offset + E, i].float())
            h = h * (p[rows, i, :E] * scaling[s])[..., None]
            delta = torch.einsum("ner,ero->no", h, Bs[i][offset:offset + E].float())
            y[rows, bounds[i][0]:bounds[i][1]] += delta.to(y.dtype)


def _interpreted() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"
