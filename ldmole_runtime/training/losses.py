"""The LD-MoLE training objective, term by term (shared/docs/LDMOLE.md, the reference code's loss.py).

    L = ce * CE + lb * LoadBalance + reg * SparsityControl(k) + lam * mean(1 - λ)

Every routing term is computed per adapted module (layer, projection) over the real tokens of the
batch, then averaged over modules. AdaMoLE's threshold router has its own load-balance term
(shared/docs/ADAMOLE.md), summed over modules as its reference code does:

    L = ce * CE + lb * Σ_modules E Σ_e f_e P_e
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class TrainingCapture:
    """Routing of every adapted module in one training forward, kept with its graph."""
    p: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, E] expert weights
    u: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, E] router logits
    lam: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] (modules whose router has λ)
    threshold: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] AdaMoLE's t (threshold router)

    def record(self, key: str, index, p: torch.Tensor, *, lam: torch.Tensor | None = None,
               threshold: torch.Tensor | None = None, u: torch.Tensor | None = None) -> None:  # a RoutingSink
        assert index is None, "training batches hold one adapter set"
        self.p[key] = p
        if u is not None:
            self.u[key] = u
        if lam is not None:
            self.lam[key] = lam
        if threshold is not None:
            self.threshold[key] = threshold


def load_balance(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E * Σ_e freq_e * prop_e per module (p [..., N, E]; leading axes are modules): freq_e the share
    of (token, expert) activations that went to e, prop_e the mean weight p_e over real tokens.
    1 when perfectly balanced."""
    E = p.shape[-1]
    m = mask.to(p.dtype).unsqueeze(-1)
    active = torch.sign(p * m)  # no gradient: only prop_e learns
    freq = active.sum(-2) / active.sum((-2, -1)).clamp(min=1).unsqueeze(-1)
    prop = (p * m).sum(-2) / m.sum().clamp(min=1)
    return E * (freq * prop).sum(-1)


def adamole_balance(p: torch.Tensor, u: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AdaMoLE's E * Σ_e f_e P_e per module (p, u [..., N, E]; t [..., N]): f_e the share of real
    tokens that selected e (no gradient), P_e the mean of g_e - t over them, g = softmax(u)."""
    E = p.shape[-1]
    m = mask.to(torch.float32).unsqueeze(-1)
    n = m.sum().clamp(min=1)
    f = ((p > 0).float() * m).sum(-2) / n
    shifted = ((torch.softmax(u.float(), dim=-1) - t.unsqueeze(-1)) * m).sum(-2) / n
    return E * (f * shifted).sum(-1)


def lambda_lower_bound(u: torch.Tensor, k: int) -> torch.Tensor:
    """The smallest λ that keeps sparsegen at k experts or fewer, per token (router logits detached):
    with U_k the sum of the k largest logits, λ in [1 - (U_k - k s_{k+1}), 1 - (U_k - k s_k)) gives k."""
    s, _ = torch.sort(u.detach().float(), dim=-1, descending=True)
    U_k = s[..., :k].sum(-1)
    return 1.0 - (U_k - k * s[..., k])


def sparsity_control(u: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """mean(relu(lower_k - λ)) over real tokens, per module (u [..., N, E], λ [..., N]): pushes λ up
    (fewer experts) where it lets more than k in."""
    if u.shape[-1] <= k:
        return lam.new_zeros(lam.shape[:-1])
    m = mask.to(lam.dtype)
    return (F.relu(lambda_lower_bound(u, k) - lam) * m).sum(-1) / m.sum().clamp(min=1)


def lambda_term(lam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean(1 - λ) over real tokens, per module (λ [..., N])."""
    m = mask.to(lam.dtype)
    return ((1.0 - lam) * m).sum(-1) / m.sum().clamp(min=1)


def _sparsity(u, lam, mask, w: LossWeights) -> torch.Tensor:
    """The sparsity-control term; without its weight it is not computed (a sort of every module's
    logits, ~1% of a training step) and logs as 0."""
    return sparsity_control(u, lam, mask, w.k).mean() if w.reg else lam.new_zeros(())


@dataclass
class LossWeights:
    ce: float = 1.0
    lb: float = 1.0
    reg: float = 0.0
    lam: float = 0.0
    k: int = 2  # SparsityControl's expert cap


def objective(
    ce: torch.Tensor, capture: TrainingCapture, mask: torch.Tensor, w: LossWeights
) -> dict[str, torch.Tensor]:
    """Every term (for logging) and the weighted total under "loss". Each term is computed for all
    modules at once (stacked on a leading axis: a handful of ops instead of a handful per module)."""
    zero = ce.new_zeros(())

    def stacked(values: dict, keys) -> torch.Tensor | None:
        return torch.stack([values[k] for k in keys]) if keys else None

    routed = [key for key in capture.p if capture.p[key].shape[-1] > 1]
    p, lam = stacked(capture.p, routed), stacked(capture.lam, list(capture.lam))
    u = stacked(capture.u, list(capture.lam)) if w.reg else None
    if p is None:
        balance = zero
    elif capture.threshold:
        balance = adamole_balance(p, stacked(capture.u, routed), stacked(capture.threshold, routed), mask).sum()
    else:
        balance = load_balance(p, mask).mean()
    terms = {
        "ce": ce,
        "load_balance": balance,
        "sparsity": _sparsity(u, lam, mask, w) if lam is not None else zero,
        "lambda": lambda_term(lam, mask).mean() if lam is not None else zero,
    }
    terms["loss"] = (
        w.ce * terms["ce"] + w.lb * terms["load_balance"] + w.reg * terms["sparsity"] + w.lam * terms["lambda"]
    )
    with torch.no_grad():
        if capture.p:
            m = mask.to(torch.float32).unsqueeze(-1)
            active = torch.stack([(v > 0).float() for v in capture.p.values()])
            terms["active_experts"] = ((active * m).sum((-2, -1)) / m.sum().clamp(min=1)).mean()
        else:
            terms["active_experts"] = zero
    return terms
