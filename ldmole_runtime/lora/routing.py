"""Routers: from router logits u (and the learned λ) to expert weights p, in fp32.

The formulas are the contract of shared/docs/LDMOLE.md. A router kind is a name in an adapter's
config; `ROUTERS` maps it to the function, so new kinds (top-k, AdaMoLE's threshold) are one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPARSEGEN_EPS = 0.01  # the reference code's eps: λ < 1 - eps and 1 - λ is floored at eps


def lambda_from_mlp(x: torch.Tensor, w1, b1, w2, b2, eps: float = SPARSEGEN_EPS) -> torch.Tensor:
    """λ = logsigmoid(Linear(h,1)(ReLU(Linear(in,h)(x)))) + (1 - eps), one value per row, in fp32.

    For bf16 activations the first layer multiplies by w1 rounded to bf16 and sums in fp32, as the
    CPU kernel's dpbf16 does (docs/benchmarks.md measures what that costs in routing agreement)."""
    if x.dtype == torch.bfloat16:
        w1 = w1.to(torch.bfloat16).float()
    hidden = F.relu(F.linear(x.float(), w1, b1))
    return F.logsigmoid(F.linear(hidden, w2, b2)).squeeze(-1) + (1.0 - eps)


def sparsegen_lin(u: torch.Tensor, lam: torch.Tensor, eps: float = SPARSEGEN_EPS, **_) -> torch.Tensor:
    """Sparsemax of u / (1 - λ) over the last axis; λ broadcasts over it. Returns p >= 0.

    The number of non-zero entries k(u) varies per row: that is the learned, per-token expert count
    of LD-MoLE. (p sums to 1 whenever 1 - λ >= eps; the floor only matters for λ within eps of 1.)
    Under autograd, the backward is written out (`_SparsegenLin`): the same gradients as
    differentiating these ops, in a handful of ops instead of a graph of ~30 per call.
    """
    u = u.float()
    lam = lam.float().unsqueeze(-1)
    if torch.is_grad_enabled() and (u.requires_grad or lam.requires_grad):
        return _SparsegenLin.apply(u, lam, eps)
    return _sparsegen_forward(u, lam, eps)[0]


def _sparsegen_forward(u: torch.Tensor, lam: torch.Tensor, eps: float):
    """p, and what the backward needs: the top-k(u) mask in u's order, k(u), the clamped excess."""
    s, order = torch.sort(u, dim=-1, descending=True)
    c = torch.cumsum(s, dim=-1)
    k = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)
    support = (1.0 - lam + k * s) > c
    k_u = support.sum(dim=-1, keepdim=True).clamp(min=1)
    tau = (torch.gather(c, -1, k_u - 1) - 1.0 + lam) / k_u.to(u.dtype)
    excess = u - tau
    p = torch.clamp(excess, min=0.0) / torch.clamp(1.0 - lam, min=eps)
    return p, order, k_u, excess


class _SparsegenLin(torch.autograd.Function):
    """d/du and d/dλ of sparsegen-lin, exactly as autograd differentiates `_sparsegen_forward`:
    with h = g·[u - τ >= 0] / d (d = max(1 - λ, eps)) and T the k(u) largest logits,
    du = h - [e in T]·Σh / k(u), dλ = -Σh / k(u) + [1 - λ >= eps]·Σ g·max(u - τ, 0) / d²."""

    @staticmethod
    def forward(ctx, u, lam, eps):
        p, order, k_u, excess = _sparsegen_forward(u, lam, eps)
        ctx.save_for_backward(p, order, k_u, excess, lam)
        ctx.eps = eps
        return p

    @staticmethod
    def backward(ctx, g):
        p, order, k_u, excess, lam = ctx.saved_tensors
        one_minus = 1.0 - lam
        d = torch.clamp(one_minus, min=ctx.eps)
        h = g * (excess >= 0) / d
        sum_h = h.sum(-1, keepdim=True)
        k = k_u.to(h.dtype)
        ranks = torch.arange(h.shape[-1], device=h.device).expand_as(order)
        top = torch.zeros_like(h).scatter_(-1, order, (ranks < k_u).to(h.dtype))
        du = h - top * (sum_h / k)
        # p * d is max(u - τ, 0): the clamped excess
        dlam = -sum_h / k + (one_minus >= ctx.eps) * (g * p).sum(-1, keepdim=True) / d
        return du, dlam.sum_to_size(lam.shape), None


def softmax_router(u: torch.Tensor, lam: torch.Tensor | None = None, **_) -> torch.Tensor:
    return torch.softmax(u.float(), dim=-1)


def top_k_router(u: torch.Tensor, lam: torch.Tensor | None = None, k: int = 2, **_) -> torch.Tensor:
    """Softmax over the k largest logits, zero elsewhere: the fixed-k MoE-LoRA baseline."""
    u = u.float()
    top, index = torch.topk(u, min(k, u.shape[-1]), dim=-1)
    return torch.zeros_like(u).scatter(-1, index, torch.softmax(top, dim=-1))


def threshold_router(u: torch.Tensor, lam: torch.Tensor, **_) -> torch.Tensor:
    """AdaMoLE (shared/docs/ADAMOLE.md): experts whose softmax gate g reaches the token's threshold t
    (given as `lam`, one per token and projection) mix with weights g - t renormalised over them; a
    token that selects none (or whose selected excesses sum to 0) gets all-zero weights."""
    a = torch.softmax(u.float(), dim=-1) - lam.float()
    w = torch.where(a >= 0, a, 0.0)
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, 1.0, total)


def threshold_from_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cap: float) -> torch.Tensor:
    """AdaMoLE's per-token threshold t = τmax · sigmoid(θ·x + b) for each projection: [n, P], fp32."""
    return cap * torch.sigmoid(F.linear(x.float(), weight.float(), bias.float()))


def single_expert(u: torch.Tensor, lam: torch.Tensor | None = None, **_) -> torch.Tensor:
    """E = 1 is plain LoRA: the one expert always has weight 1."""
    return torch.ones_like(u, dtype=torch.float32)


@dataclass(frozen=True)
class Router:
    route: Callable[..., torch.Tensor]  # (u, λ or None, **options) -> p
    needs_lambda: bool  # whether the adapter carries λ-networks for this router
    needs_logits: bool  # whether the adapter carries router weights
    needs_threshold: bool = False  # whether the adapter carries AdaMoLE threshold layers (one per projection)


ROUTERS: dict[str, Router] = {
    "sparsegen": Router(sparsegen_lin, needs_lambda=True, needs_logits=True),
    "softmax": Router(softmax_router, needs_lambda=False, needs_logits=True),
    "topk": Router(top_k_router, needs_lambda=False, needs_logits=True),
    "threshold": Router(threshold_router, needs_lambda=False, needs_logits=True, needs_threshold=True),
    "none": Router(single_expert, needs_lambda=False, needs_logits=False),
}
