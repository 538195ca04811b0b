"""Optional per-forward record of routing, for `ldmole forward`, reports and the serving metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingCapture:
    num_tokens: int
    num_experts: int
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # "{layer}.{proj}" -> [N, E]
    lambdas: dict[str, torch.Tensor] = field(default_factory=dict)  # "{layer}.{proj}" -> [N]

    def record(self, key: str, index, p: torch.Tensor, lam: torch.Tensor | None, u: torch.Tensor | None = None) -> None:
        if key not in self.routing:
            self.routing[key] = torch.zeros(self.num_tokens, self.num_experts, device=p.device)
            self.lambdas[key] = torch.full((self.num_tokens,), float("nan"), device=p.device)
        rows = slice(None) if index is None else index
        p = p[:, :self.num_experts]  # a kernel's p may be padded to the bank's widest set
        self.routing[key][rows, :p.shape[-1]] = p
        if lam is not None:
            self.lambdas[key][rows] = lam
