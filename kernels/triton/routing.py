"""Routing of every adapted token of a step, spread over the chip (its torch reference, which needs the
runtime's routers, is `route_blocks_reference` beside the torch backend, lora/ops/torch_ref.py).

Two parts, for the group's shared input x and each block of the step's block table (at most
BLOCK_M tokens of one set; see `ldmole_runtime/lora/adapter_batch.py`):

1. `_route_gemm_kernel`, one launch, grid (blocks, chunks): the three small GEMMs, each chunk of
   16 output columns a program of its own, so that even one token's routing spreads over
   H/16 + E·P/16 + 1 programs instead of one:
       z_c = Σ_{h in chunk c} w2_h · ReLU(x · w1_h + b1_h)           (sparsegen sets: λ-network)
       u   = x @ router[set]ᵀ                                          router logits, [BLOCK_M, E·P]
       a   = θ · x                                                     (AdaMoLE sets: threshold layers)
   into a per-token work row [z_0 .. z_{NH-1} | u | a] (fp32). A block whose set adapts none of the
   group's projections, and a chunk its router has no use for, returns at once.
2. `route_projection`, a device function: λ = logsigmoid(b2 + Σ_c z_c) + 1 - eps, t_i = τmax ·
   sigmoid(a_i + b_i), then the router over the E ≤ 16 logits of one projection, in registers:
   sparsegen-lin without a sort (an element is in the support iff 1 - λ + k·u_e > Σ of the k logits
   ≥ u_e, the sorted test at the last position of u_e's ties), softmax, top-k, AdaMoLE's threshold
   (softmax minus t, the non-negative part renormalised), or p = 1 for E = 1. Each shrink program
   (one projection, one expert) calls it (kernels/triton/shrink_expand.py), so a step needs no
   third routing launch;
   `route_blocks` runs it alone (`_route_epilogue_kernel`), for tests and tools.

p [N, P, E_max] fp32 (zero where an expert is inactive or a projection not adapted) is what the
expert kernels read; λ (or t) goes to [N, P] for routing captures.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

CHUNK_COLUMNS = 16  # output columns per routing program (tl.dot's smallest tile)
CHUNK = tl.constexpr(CHUNK_COLUMNS)  # the same, as kernels read it
ROUTE_WARPS = 4
# fp32 inputs on tensor cores, as three tf32 MMAs (big·big + big·small + small·big): ~fp32 accuracy at
# ~2.5x the H100's FP32 CUDA-core rate. With "ieee" the GEMMs run as CUDA-core FMAs and bound the
# decode step (cli/cost_model.py). tests/kernels/test_route_precision.py holds the fixtures to it.
ROUTE_PRECISION = "tf32x3"


@triton.jit
def _route_gemm_kernel(x_ptr, stride_x, tokens_ptr, blocks_ptr, set_info_ptr, mask_ptr, router_ptr,
                       w1_ptr, b1_ptr, w2_ptr, thr_w_ptr, work_ptr, IN, H,
                       P: tl.constexpr, EP: tl.constexpr, NH: tl.constexpr, WORK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_LAMBDA: tl.constexpr,
                       PRECISION: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)  # chunks: NH of λ hidden units, EP / 16 of router logits, 1 of thresholds
    s = tl.load(blocks_ptr + 3 * b)
    ps = tl.arange(0, CHUNK)
    adapts = tl.sum(tl.load(mask_ptr + tl.maximum(s, 0) * P + ps, mask=ps < tl.where(s >= 0, P, 0), other=0.0))
    kind = tl.load(set_info_ptr + 5 * tl.maximum(s, 0) + 2)  # numbered as RouterKind (router_kinds.py)
    is_lambda = c < NH
    is_logits = (c >= NH) & (c < NH + EP // CHUNK)
    # the chunks this block's router needs: λ for sparsegen, logits unless E = 1, thresholds for AdaMoLE
    needed = tl.where(is_lambda, kind == 0, tl.where(is_logits, kind != 2, kind == 4))
    if (adapts > 0.0) & needed:
        start = tl.load(blocks_ptr + 3 * b + 1)
        end = tl.load(blocks_ptr + 3 * b + 2)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
        offset = tl.load(set_info_ptr + 5 * s)
        E = tl.load(set_info_ptr + 5 * s + 1)
        acc = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
        if is_lambda:
            if HAS_LAMBDA:  # else no set has a λ-network of this fan-in (and no sparsegen set adapts the group)
                hs = c * CHUNK + ps
                h_ok = hs < H
                for k0 in range(0, IN, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < IN
                    xk = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :],
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                    w1 = tl.load(w1_ptr + s * H * IN + hs[:, None] * IN + ks[None, :],
                                 mask=h_ok[:, None] & k_ok[None, :], other=0.0)
                    acc += tl.dot(xk, tl.trans(w1), input_precision=PRECISION)
                b1 = tl.load(b1_ptr + s * H + hs, mask=h_ok, other=0.0)
                w2 = tl.load(w2_ptr + s * H + hs, mask=h_ok, other=0.0)
                z = tl.sum(tl.maximum(acc + b1[None, :], 0.0) * w2[None, :], axis=1)
                tl.store(work_ptr + tok * WORK + c, z, mask=row_ok)
        elif is_logits:
            cols = (c - NH) * CHUNK + ps  # column e·P + i: expert e of projection i, as router[g] is [P, in]
            col_ok = cols // P < E
            for k0 in range(0, IN, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < IN
                xk = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                             other=0.0).to(tl.float32)
                r = tl.load(router_ptr + (offset * P + cols)[:, None] * IN + ks[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(xk, tl.trans(r), input_precision=PRECISION)
            tl.store(work_ptr + tok[:, None] * WORK + NH + cols[None, :], acc, mask=row_ok[:, None])
        else:  # AdaMoLE's threshold layers: P ≤ 3 rows, padded to a dot-sized tile
            for k0 in range(0, IN, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < IN
                xk = tl.load(x_ptr + tok[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                             other=0.0).to(tl.float32)
                tw = tl.load(thr_w_ptr + (s * P + ps[:, None]) * IN + ks[None, :],
                             mask=(ps < P)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(xk, tl.trans(tw), input_precision=PRECISION)
            tl.store(work_ptr + tok[:, None] * WORK + NH + EP + ps[None, :], acc, mask=row_ok[:, None])


@triton.jit
def route_projection(work_ptr, tok, row_ok, s, i, set_info_ptr, mask_ptr, b2_ptr, thr_b_ptr, cap_ptr, eps,
                     P: tl.constexpr, EP: tl.constexpr, NH: tl.constexpr, WORK: tl.constexpr,
                     BLOCK_M: tl.constexpr, HAS_LAMBDA: tl.constexpr):
    """The router of projection i for the block's tokens, from their work rows: p [BLOCK_M, 16]
    (expert e in column e; zero past E, and everywhere when the set does not adapt projection i)
    and the scalar a capture records [BLOCK_M] (λ, or AdaMoLE's t_i)."""
    E = tl.load(set_info_ptr + 5 * s + 1)
    kind = tl.load(set_info_ptr + 5 * s + 2)
    top_k = tl.load(set_info_ptr + 5 * s + 3)
    es = tl.arange(0, CHUNK)  # E <= 16 experts
    col_ok = es < E
    row = work_ptr + tok * WORK

    lam = tl.zeros((BLOCK_M,), dtype=tl.float32)  # read only by sparsegen sets, which have a λ-network
    if HAS_LAMBDA:
        if kind == 0:
            hc = tl.arange(0, NH)
            z = tl.sum(tl.load(row[:, None] + hc[None, :], mask=row_ok[:, None], other=0.0), axis=1)
            z += tl.load(b2_ptr + s)
            lam = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z))) + (1.0 - eps)  # logsigmoid + 1 - eps
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)  # AdaMoLE's threshold of projection i
    if kind == 4:
        a = tl.load(row + NH + EP + i, mask=row_ok, other=0.0)
        t = tl.load(cap_ptr + s) / (1.0 + tl.exp(-(a + tl.load(thr_b_ptr + s * P + i).to(tl.float32))))
    u = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    if kind != 2:  # logit of expert e of projection i sits in column e·P + i
        u = tl.load(row[:, None] + NH + es[None, :] * P + i, mask=row_ok[:, None] & col_ok[None, :], other=0.0)

    # for every expert: how many logits are >= its own, their sum, and its rank
    count_ge = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    sum_ge = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    rank = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
    for c in range(0, E):
        uc = tl.sum(tl.where(es[None, :] == c, u, 0.0), axis=1)[:, None]
        ge = uc >= u
        count_ge += tl.where(ge, 1.0, 0.0)
        sum_ge += tl.where(ge, uc, 0.0)
        rank += tl.where((uc > u) | ((uc == u) & (c < es[None, :])), 1.0, 0.0)

    support = ((1.0 - lam[:, None] + count_ge * u) > sum_ge) & col_ok[None, :]
    k = tl.sum(tl.where(support, 1.0, 0.0), axis=1)
    tau = (tl.sum(tl.where(support, u, 0.0), axis=1) - 1.0 + lam) / tl.maximum(k, 1.0)
    p_sparsegen = tl.maximum(u - tau[:, None], 0.0) / tl.maximum(1.0 - lam, eps)[:, None]
    keep = col_ok[None, :] & ((kind != 3) | (rank < top_k))
    big = tl.max(tl.where(keep, u, -float("inf")), axis=1)
    ex = tl.where(keep, tl.exp(u - big[:, None]), 0.0)
    p_softmax = ex / tl.sum(ex, axis=1)[:, None]
    excess = tl.where(keep & (p_softmax - t[:, None] >= 0.0), p_softmax - t[:, None], 0.0)
    total = tl.sum(excess, axis=1)
    p_threshold = excess / tl.where(total == 0.0, 1.0, total)[:, None]
    p = tl.where(kind == 0, p_sparsegen, tl.where(kind == 2, 1.0, tl.where(kind == 4, p_threshold, p_softmax)))
    # a projection the set does not adapt: exact zeros (its work row may never have been written)
    adapted = tl.load(mask_ptr + s * P + i)
    p = tl.where(col_ok[None, :], p, 0.0)
    p = tl.where(adapted > 0.0, p, 0.0)
    return p, tl.where(kind == 4, t, lam)


@triton.jit
def _route_epilogue_kernel(tokens_ptr, blocks_ptr, set_info_ptr, mask_ptr, b2_ptr, thr_b_ptr, cap_ptr, work_ptr,
                           p_ptr, scalar_ptr, eps, P: tl.constexpr, EMAX: tl.constexpr, EP: tl.constexpr,
                           NH: tl.constexpr, WORK: tl.constexpr, BLOCK_M: tl.constexpr,
                           HAS_LAMBDA: tl.constexpr, STORE_SCALAR: tl.constexpr):
    b = tl.program_id(0)
    s = tl.load(blocks_ptr + 3 * b)
    if s >= 0:
        start = tl.load(blocks_ptr + 3 * b + 1)
        end = tl.load(blocks_ptr + 3 * b + 2)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        tok = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
        es = tl.arange(0, CHUNK)
        has_scalar = scalar_rows(rows, end, s, set_info_ptr, mask_ptr, P)
        for i in tl.static_range(P):
            p, scalar = route_projection(work_ptr, tok, row_ok, s, i, set_info_ptr, mask_ptr, b2_ptr, thr_b_ptr,
                                         cap_ptr, eps, P, EP, NH, WORK, BLOCK_M, HAS_LAMBDA)
            tl.store(p_ptr + tok[:, None] * (P * EMAX) + i * EMAX + es[None, :], p,
                     mask=row_ok[:, None] & (es < EMAX)[None, :])
            if STORE_SCALAR:
                tl.store(scalar_ptr + tok * P + i, scalar, mask=has_scalar)


@triton.jit
def scalar_rows(rows, end, s, set_info_ptr, mask_ptr, P: tl.constexpr):
    """The rows whose routing has a scalar to capture: λ (sparsegen) or t (AdaMoLE), of a set that adapts
    the group."""
    kind = tl.load(set_info_ptr + 5 * s + 2)
    ps = tl.arange(0, CHUNK)
    adapts = tl.sum(tl.load(mask_ptr + s * P + ps, mask=ps < P, other=0.0))
    return rows < tl.where(((kind == 0) | (kind == 4)) & (adapts > 0.0), end, 0)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


class RoutingPlan:
    """The shapes one group's routing runs with: the work row layout and the constexprs both parts use."""

    def __init__(self, P: int, max_experts: int, lambdas: tuple[torch.Tensor, ...] | None, hidden: int | None = None):
        self.P, self.EMAX = P, max_experts
        self.EP = _pow2(max_experts * P)
        self.H = hidden or (lambdas[0].shape[1] if lambdas is not None else 1)
        self.NH = _pow2(triton.cdiv(self.H, CHUNK_COLUMNS), least=1) if lambdas is not None or hidden else 1
        self.WORK = self.NH + self.EP + CHUNK_COLUMNS  # z chunks | router logits | threshold pre-activations
        self.has_lambda = lambdas is not None

    @property
    def chunks(self) -> int:
        return self.NH + self.EP // CHUNK_COLUMNS + 1

    def constexprs(self) -> dict:
        return dict(P=self.P, EP=self.EP, NH=self.NH, WORK=self.WORK, HAS_LAMBDA=self.has_lambda)


def route_logits(x: torch.Tensor, sorted_tokens: torch.Tensor, blocks: torch.Tensor, set_info: torch.Tensor,
                 masks: torch.Tensor, router: torch.Tensor, lambdas: tuple[torch.Tensor, ...] | None,
                 thr_w: torch.Tensor, plan: RoutingPlan, block_m: int,
                 work: torch.Tensor | None = None) -> torch.Tensor:
    """The routing GEMMs of every block into work rows [N, plan.WORK] fp32 (`work`: a flat buffer to use)."""
    N, IN = x.shape
    assert x.stride(1) == 1 and router.is_contiguous() and masks.is_contiguous()
    numel = N * plan.WORK
    work = (torch.empty(numel, device=x.device, dtype=torch.float32) if work is None else work[:numel])
    w1, b1, w2 = lambdas[:3] if lambdas is not None else (work, work, work)  # HAS_LAMBDA=False: never read
    _route_gemm_kernel[(blocks.shape[0], plan.chunks)](
        x, x.stride(0), sorted_tokens, blocks, set_info, masks, router, w1, b1, w2, thr_w, work, IN, plan.H,
        BLOCK_M=block_m, BLOCK_K=32, PRECISION=ROUTE_PRECISION, **plan.constexprs(), num_warps=ROUTE_WARPS)
    return work.view(N, plan.WORK)


def route_blocks(x: torch.Tensor, sorted_tokens: torch.Tensor, blocks: torch.Tensor, set_info: torch.Tensor,
                 masks: torch.Tensor, router: torch.Tensor, lambdas: tuple[torch.Tensor, ...] | None,
                 thresholds: tuple[torch.Tensor, torch.Tensor, torch.Tensor], max_experts: int, eps: float,
                 block_m: int, scalar_out: torch.Tensor | None = None) -> torch.Tensor:
    """p [N, P, max_experts] fp32 for every token in `blocks` (rows of other tokens are left unwritten);
    λ or t into scalar_out [N, P]. Both routing parts as two launches; the backend instead runs the
    epilogue inside the shrink kernel.

    x [N, in]; router [G, P, in] (the bank's); masks [S, P]; lambdas (w1 [S, H, in], b1, w2, b2)
    for this fan-in, or None when no loaded set has a λ-network of this width; thresholds
    (θ [S, P, in], b [S, P], τmax [S])."""
    N = x.shape[0]
    P = router.shape[1]
    plan = RoutingPlan(P, max_experts, lambdas)
    work = route_logits(x, sorted_tokens, blocks, set_info, masks, router, lambdas, thresholds[0], plan, block_m)
    p = torch.empty(N, P, max_experts, device=x.device, dtype=torch.float32)
    b2 = lambdas[3] if lambdas is not None else p
    scalars = scalar_out if scalar_out is not None else p  # a pointer the kernel never writes
    _route_epilogue_kernel[(blocks.shape[0],)](
        sorted_tokens, blocks, set_info, masks, b2, thresholds[1], thresholds[2], work, p, scalars, eps,
        EMAX=max_experts, BLOCK_M=block_m, STORE_SCALAR=scalar_out is not None,
        **{k: v for k, v in plan.constexprs().items()}, num_warps=ROUTE_WARPS)
    return p
