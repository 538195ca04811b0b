"""Optional per-forward record of routing, for `ldmole forward`, reports and the serving metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class RoutingSink(Protocol):
    """Whatever receives routing as the adapters compute it, projection by projection: RoutingCapture
    (`ldmole forward`, reports), the engine's ActiveExpertCount (metrics) and training's
    TrainingCapture (the routing losses)."""

    def record(self, key: str, index: torch.Tensor | None, p: torch.Tensor, *, lam: torch.Tensor | None = None,
               threshold: torch.Tensor | None = None, u: torch.Tensor | None = None) -> None:
        """key "{layer}.{proj}"; the rows `index` of the forward's tokens (None: all); p [n, E]; the
        Sparsegen routers' λ [n] or AdaMoLE's threshold [n] (None for routers without one); the router
        logits u [n, E] (None where the backend does not keep them)."""


@dataclass
class RoutingCapture:
    num_tokens: int
    num_experts: int
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # "{layer}.{proj}" -> [N, E]
    # "{layer}.{proj}" -> [N]; NaN for tokens whose router has no λ (no threshold)
    lambdas: dict[str, torch.Tensor] = field(default_factory=dict)
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self, key: str, index, p: torch.Tensor, *, lam: torch.Tensor | None = None,
               threshold: torch.Tensor | None = None, u: torch.Tensor | None = None) -> None:  # a RoutingSink
        if key not in self.routing:
            self.routing[key] = torch.zeros(self.num_tokens, self.num_experts, device=p.device)
            self.lambdas[key] = torch.full((self.num_tokens,), float("nan"), device=p.device)
            self.thresholds[key] = torch.full((self.num_tokens,), float("nan"), device=p.device)
        rows = slice(None) if index is None else index
        p = p[:, :self.num_experts]  # a kernel's p may be padded to the bank's widest set
        self.routing[key][rows, :p.shape[-1]] = p
        if lam is not None:
            self.lambdas[key][rows] = lam
        if threshold is not None:
            self.thresholds[key][rows] = threshold


class TeeSink:
    """Hands every record to each of several sinks (a step can feed the metrics and a request's routing)."""

    def __init__(self, *sinks):
        self.sinks = [s for s in sinks if s is not None]

    def record(self, key: str, index, p: torch.Tensor, **kw) -> None:  # a RoutingSink
        for sink in self.sinks:
            sink.record(key, index, p, **kw)
