"""Routing of every adapted token of a step in one launch (its torch reference, which needs the
runtime's routers, is `route_blocks_reference` beside the torch backend, lora/ops/torch_ref.py).

One program per block of the step's block table (at most BLOCK_M tokens of one set; see
`ldmole_runtime/lora/adapter_batch.py`). It computes, for the group's shared input x:

    u = x @ router[set]ᵀ                      router logits of every projection, [BLOCK_M, E·P]
    λ = logsigmoid(w2 · ReLU(x @ w1ᵀ + b1) + b2) + 1 - eps       (sparsegen sets only)
    t_i = τmax · sigmoid(θ_i · x + b_i)                            (AdaMoLE threshold sets only)

and then the router itself over E ≤ 16 logits per projection, in registers: sparsegen-lin without
a sort (an element is in the support iff 1 - λ + k·u_e > Σ of the k logits ≥ u_e, which is the
sorted test at the last position of u_e's ties), softmax, top-k, AdaMoLE's threshold (softmax
minus t, the non-negative part renormalised), or p = 1 for E = 1. p [N, P, E_max] (fp32, zero
where a token has no set or an expert is inactive) is what the expert kernels read; λ (or t) goes
to [N, P] for routing captures.

Why fused: after the two small GEMMs, everything else is elementwise work on a few dozen numbers
per token; as separate torch ops it was ~30 launches per group and set, each reading and writing
the whole tile again.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl


@triton.jit
def _route_kernel(x_ptr, stride_x, tokens_ptr, blocks_ptr, set_info_ptr, mask_ptr, router_ptr,
                  w1_ptr, b1_ptr, w2_ptr, b2_ptr, thr_w_ptr, thr_b_ptr, cap_ptr, p_ptr, scalar_ptr, IN, H, eps,
                  P: tl.constexpr, EMAX: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, HAS_LAMBDA: tl.constexpr,
                  STORE_SCALAR: tl.constexpr):
    b = tl.program_id(0)
    s = tl.load(blocks_ptr + 3 * b)
    if s >= 0:
        start = tl.load(blocks_ptr + 3 * b + 1)
        end = tl.load(blocks_ptr + 3 * b + 2)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
        cols = tl.arange(0, EP)  # column c is expert c // P of projection c % P, as router[g] is [P, in]
        e_of = cols // P
        i_of = cols % P
        ps = tl.arange(0, 16)  # a group's projections (P ≤ 3), padded to a dot-sized tile
        # a set that adapts none of this group's projections routes nothing here: its p is all zero
        adapts = tl.sum(tl.load(mask_ptr + s * P + ps, mask=ps < P, other=0.0))
        if adapts == 0.0:
            tl.store(p_ptr + tok[:, None] * (P * EMAX) + cols[None, :], tl.zeros((BLOCK_M, EP), dtype=tl.float32),
                     mask=row_ok[:, None] & (cols < P * EMAX)[None, :])
        else:
            _route_block(x_ptr, stride_x, tok, row_ok, rows, end, s, cols, e_of, i_of, ps, set_info_ptr, mask_ptr,
                         router_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, thr_w_ptr, thr_b_ptr, cap_ptr, p_ptr,
                         scalar_ptr, IN, H, eps, P, EMAX, EP, BLOCK_M, BLOCK_K, BLOCK_H, HAS_LAMBDA, STORE_SCALAR)


@triton.jit
def _route_block(x_ptr, stride_x, tok, row_ok, rows, end, s, cols, e_of, i_of, ps, set_info_ptr, mask_ptr,
                 router_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, thr_w_ptr, thr_b_ptr, cap_ptr, p_ptr, scalar_ptr,
                 IN, H, eps, P: tl.constexpr, EMAX: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, HAS_LAMBDA: tl.constexpr,
                 STORE_SCALAR: tl.constexpr):
    offset = tl.load(set_info_ptr + 5 * s)  # set_info rows: expert offset, E, router kind, top-k, rank
    E = tl.load(set_info_ptr + 5 * s + 1)
    kind = tl.load(set_info_ptr + 5 * s + 2)  # numbered as RouterKind (router_kinds.py)
    top_k = tl.load(set_info_ptr + 5 * s + 3)
    col_ok = e_of < E
    load_t = ps < P

    # router logits and AdaMoLE's threshold layers: one pass over x
    acc_u = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < IN
        xk = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        if kind != 2:  # E = 1 (kind 2) has no router weights
            r = tl.load(router_ptr + (offset * P + cols)[:, None] * IN + ks[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc_u += tl.dot(xk, tl.trans(r), input_precision="ieee")
        if kind == 4:
            tw = tl.load(thr_w_ptr + (s * P + ps[:, None]) * IN + ks[None, :],
                         mask=load_t[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc_t += tl.dot(xk, tl.trans(tw), input_precision="ieee")

    # λ = logsigmoid(w2 · ReLU(x w1ᵀ + b1) + b2) + 1 - eps, the hidden layer BLOCK_H units at a time:
    # the sum over units splits, and a [BLOCK_M, BLOCK_H] accumulator stays in registers
    lam = tl.zeros((BLOCK_M,), dtype=tl.float32)  # read only by sparsegen sets, which have a λ-network
    if HAS_LAMBDA:  # some set has a λ-network of this fan-in: w1 [S, H, IN] holds a row per set
        if kind == 0:
            z = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(b2_ptr + s)
            for h0 in range(0, H, BLOCK_H):
                hs = h0 + tl.arange(0, BLOCK_H)
                h_ok = hs < H
                acc_h = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, IN, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < IN
                    xk = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :],
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    w1 = tl.load(w1_ptr + s * H * IN + hs[:, None] * IN + ks[None, :],
                                 mask=h_ok[:, None] & k_ok[None, :], other=0.0)
                    acc_h += tl.dot(xk, tl.trans(w1), input_precision="ieee")
                b1 = tl.load(b1_ptr + s * H + hs, mask=h_ok, other=0.0)
                w2 = tl.load(w2_ptr + s * H + hs, mask=h_ok, other=0.0)
                z += tl.sum(tl.maximum(acc_h + b1[None, :], 0.0) * w2[None, :], axis=1)
            lam = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z))) + (1.0 - eps)  # logsigmoid + 1 - eps
    tb = tl.load(thr_b_ptr + s * P + ps, mask=load_t, other=0.0).to(tl.float32)
    # [BLOCK_M, 16]: the threshold of projection i in column i
    t = tl.load(cap_ptr + s) / (1.0 + tl.exp(-(acc_t + tb[None, :])))

    u = tl.where(col_ok[None, :], acc_u, 0.0)
    # for every column: how many logits of its projection are >= it, their sum, and its rank
    count_ge = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    sum_ge = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    rank = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    for c in range(0, EMAX * P):
        uc = tl.sum(tl.where(cols[None, :] == c, u, 0.0), axis=1)[:, None]
        peer = (i_of[None, :] == c % P) & (c // P < E)
        ge = peer & (uc >= u)
        count_ge += tl.where(ge, 1.0, 0.0)
        sum_ge += tl.where(ge, uc, 0.0)
        rank += tl.where(peer & ((uc > u) | ((uc == u) & (c < cols[None, :]))), 1.0, 0.0)

    support = ((1.0 - lam[:, None] + count_ge * u) > sum_ge) & col_ok[None, :]
    chosen = (rank < top_k) & col_ok[None, :]
    tau = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    big = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    denom = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    t_col = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    scalar_col = tl.zeros((BLOCK_M, 16), dtype=tl.float32)  # what is captured: λ, or t per projection
    for i in tl.static_range(P):
        mine = (i_of == i)[None, :]
        t_i = tl.sum(tl.where(ps[None, :] == i, t, 0.0), axis=1)
        t_col = tl.where(mine, t_i[:, None], t_col)
        scalar_col = tl.where(ps[None, :] == i, tl.where(kind == 4, t_i, lam)[:, None], scalar_col)
        k_i = tl.sum(tl.where(support & mine, 1.0, 0.0), axis=1)
        s_i = tl.sum(tl.where(support & mine, u, 0.0), axis=1)
        tau = tl.where(mine, ((s_i - 1.0 + lam) / tl.maximum(k_i, 1.0))[:, None], tau)
        keep = mine & col_ok[None, :] & ((kind != 3) | chosen)
        m_i = tl.max(tl.where(keep, u, -float("inf")), axis=1)
        big = tl.where(mine, m_i[:, None], big)
        ex_i = tl.where(keep, tl.exp(u - m_i[:, None]), 0.0)
        denom = tl.where(mine, tl.sum(ex_i, axis=1)[:, None], denom)

    p_sparsegen = tl.maximum(u - tau, 0.0) / tl.maximum(1.0 - lam, eps)[:, None]
    keep = col_ok[None, :] & ((kind != 3) | chosen)
    p_softmax = tl.where(keep, tl.exp(u - big) / denom, 0.0)
    excess = tl.where(keep & (p_softmax - t_col >= 0.0), p_softmax - t_col, 0.0)
    total = tl.zeros((BLOCK_M, EP), dtype=tl.float32)
    for i in tl.static_range(P):
        mine = (i_of == i)[None, :]
        total = tl.where(mine, tl.sum(tl.where(mine, excess, 0.0), axis=1)[:, None], total)
    p_threshold = excess / tl.where(total == 0.0, 1.0, total)
    p = tl.where(kind == 0, p_sparsegen, tl.where(kind == 2, 1.0, tl.where(kind == 4, p_threshold, p_softmax)))
    p = tl.where(col_ok[None, :], p, 0.0) * tl.load(mask_ptr + s * P + i_of)[None, :]
    # every one of the row's P·EMAX entries is written (zeros past the set's E): p needs no memset
    tl.store(p_ptr + tok[:, None] * (P * EMAX) + (i_of * EMAX + e_of)[None, :], p,
             mask=row_ok[:, None] & (cols < P * EMAX)[None, :])
    if STORE_SCALAR:
        has_scalar = rows < tl.where((kind == 0) | (kind == 4), end, 0)  # λ (sparsegen) or t (AdaMoLE)
        tl.store(scalar_ptr + tok[:, None] * P + ps[None, :], scalar_col,
                 mask=has_scalar[:, None] & (ps < P)[None, :])


# hidden units of the λ-network per pass over x: 64 keeps the accumulator at 8 fp32 registers per thread
# (16 x 64 over 128 threads) and the kernel free of spills on sm_80 and sm_90 (tests/kernels/test_triton_compile.py)
LAMBDA_UNITS_PER_PASS = 64
# the router's [BLOCK_M, E·P] work tiles (up to 16 x 64, seven of them live at once) over 256 threads, not
# 128; and a register budget ptxas may use: left to itself, at 256 threads it chose 64 registers and spilled
# a few bytes (`ldmole compile-kernels` reports 0 spills on sm_80 and sm_90 with these)
ROUTE_WARPS = 8
ROUTE_MAX_REGISTERS = 128


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def route_blocks(x: torch.Tensor, sorted_tokens: torch.Tensor, blocks: torch.Tensor, set_info: torch.Tensor,
                 masks: torch.Tensor, router: torch.Tensor, lambdas: tuple[torch.Tensor, ...] | None,
                 thresholds: tuple[torch.Tensor, torch.Tensor, torch.Tensor], max_experts: int, eps: float,
                 block_m: int, scalar_out: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """p [N, P, max_experts] fp32 for every token in `blocks` (rows of other tokens are left unwritten);
    λ or t into scalar_out [N, P].

    x [N, in]; router [G, P, in] (the bank's); masks [S, P]; lambdas (w1 [S, H, in], b1, w2, b2)
    for this fan-in, or None when no loaded set has a λ-network of this width; thresholds
    (θ [S, P, in], b [S, P], τmax [S])."""
    N, IN = x.shape
    P = router.shape[1]
    assert x.stride(1) == 1 and router.is_contiguous() and masks.is_contiguous()
    # rows of tokens in `blocks` are written whole; other rows (bare-base tokens) are never read. `out`: a
    # flat fp32 buffer to hold p (a step's scratch, reused by every group), else a new one
    numel = N * P * max_experts
    p = torch.empty(numel, device=x.device, dtype=torch.float32) if out is None else out[:numel]
    p = p.view(N, P, max_experts)
    if lambdas is None:  # no set has a λ-network of this fan-in: HAS_LAMBDA=False, never read
        w1 = b1 = w2 = b2 = p
        H = 1
    else:
        w1, b1, w2, b2 = lambdas
        H = w1.shape[1]
    scalars = scalar_out if scalar_out is not None else p  # a pointer the kernel never writes
    _route_kernel[(blocks.shape[0],)](
        x, x.stride(0), sorted_tokens, blocks, set_info, masks, router, w1, b1, w2, b2, *thresholds, p, scalars,
        IN, H, eps, P=P, EMAX=max_experts, EP=_pow2(max_experts * P), BLOCK_M=block_m, BLOCK_K=32,
        BLOCK_H=min(_pow2(H), LAMBDA_UNITS_PER_PASS), HAS_LAMBDA=lambdas is not None,
        STORE_SCALAR=scalar_out is not None, num_warps=ROUTE_WARPS, num_stages=1,
        maxnreg=ROUTE_MAX_REGISTERS)
    return p
