"""The LD-MoLE training objective, term by term (shared/docs/LDMOLE.md, the reference code's loss.py).

    L = ce * CE + lb * LoadBalance + reg * SparsityControl(k) + lam * mean(1 - λ)

Every routing term is computed per adapted module (layer, projection) over the real tokens of the
batch, then averaged over modules.
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

    def record(self, key: str, index, p: torch.Tensor, lam: torch.Tensor | None, u: torch.Tensor | None = None) -> None:
        assert index is None, "training batches hold one adapter set"
        self.p[key] = p
        if u is not None:
            self.u[key] = u
        if lam is not None:
            self.lam[key] = lam


def load_balance(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E * Σ_e freq_e * prop_e for one module: freq_e the share of (token, expert) activations that
    went to e, prop_e the mean weight p_e over real tokens. 1 when perfectly balanced."""
    E = p.shape[-1]
    m = mask.to(p.dtype).unsqueeze(-1)
    active = torch.sign(p * m)  # no gradient: only prop_e learns
    freq = active.sum(0) / active.sum().clamp(min=1)
    prop = (p * m).sum(0) / m.sum().clamp(min=1)
    return E * (freq * prop).sum()


def lambda_lower_bound(u: torch.Tensor, k: int) -> torch.Tensor:
    """The smallest λ that keeps sparsegen at k experts or fewer, per token (router logits detached):
    with U_k the sum of the k largest logits, λ in [1 - (U_k - k s_{k+1}), 1 - (U_k - k s_k)) gives k."""
    s, _ = torch.sort(u.detach().float(), dim=-1, descending=True)
    U_k = s[..., :k].sum(-1)
    return 1.0 - (U_k - k * s[..., k])


def sparsity_control(u: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """mean(relu(lower_k - λ)) over real tokens: pushes λ up (fewer experts) where it lets more than k in."""
    if u.shape[-1] <= k:
        return lam.new_zeros(())
    m = mask.to(lam.dtype)
    return (F.relu(lambda_lower_bound(u, k) - lam) * m).sum() / m.sum().clamp(min=1)


def lambda_term(lam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(lam.dtype)
    return ((1.0 - lam) * m).sum() / m.sum().clamp(min=1)


@dataclass
class LossWeights:
    ce: float = 1.0
    lb: float = 1.0
    reg: float = 0.0
    lam: float = 0.0
    k: int = 2  # SparsityControl's expert cap


def objective(ce: torch.Tensor, capture: TrainingCapture, mask: torch.Tensor, w: LossWeights) -> dict[str, torch.Tensor]:
    """Every term (for logging) and the weighted total under "loss"."""
    zero = ce.new_zeros(())

    def mean(values):
        return torch.stack(values).mean() if values else zero

    routed = [key for key in capture.p if capture.p[key].shape[-1] > 1]
    terms = {
        "ce": ce,
        "load_balance": mean([load_balance(capture.p[k], mask) for k in routed]),
        "sparsity": mean([sparsity_control(capture.u[k], capture.lam[k], mask, w.k) for k in capture.lam]),
        "lambda": mean([lambda_term(capture.lam[k], mask) for k in capture.lam]),
    }
    terms["loss"] = w.ce * terms["ce"] + w.lb * terms["load_balance"] + w.reg * terms["sparsity"] + w.lam * terms["lambda"]
    with torch.no_grad():
        m = mask.to(torch.float32).unsqueeze(-1)
        active = [((capture.p[k] > 0).float() * m).sum() / m.sum().clamp(min=1) for k in capture.p]
        terms["active_experts"] = mean(active) if active else zero
    return terms
