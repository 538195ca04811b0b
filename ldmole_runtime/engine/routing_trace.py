"""Per-token routing for the requests that ask for it (`SamplingParams.routing`): how many experts,
and which with what weight, each adapted projection of each layer used, token by token.

A step with such a request hands the forward a `StepRouting` sink: every adapted projection writes
its p (and λ, or AdaMoLE's threshold) into one tensor for the whole step, so the forward itself
makes no sync; after it, the rows the requests want are read back in one copy. Steps without such a
request pay nothing.

A token's entry is the routing of the forward position whose logits chose it, as logprobs are
aligned: a generated token's is the position before it, and so is a prompt token's (the first
prompt token has none). So every generated token has one, the last included, with no extra forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmole_runtime.adapters.spec import ALL_PROJECTIONS


@dataclass(frozen=True)
class RoutingEntry:
    """One token's routing, on the host: p [layers, projections, E] in ALL_PROJECTIONS order (zeros
    for projections the set does not adapt), and each router's scalar (λ, or AdaMoLE's threshold;
    NaN where there is none) [layers, projections]."""
    p: torch.Tensor
    scalar: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """Active experts per layer and projection [layers, projections]."""
        return (self.p > 0).sum(-1)


class StepRouting:
    """A RoutingSink for one engine step (see the module docstring)."""

    def __init__(self, num_tokens: int, num_layers: int, num_experts: int, device):
        P = len(ALL_PROJECTIONS)
        self.where = {f"{layer}.{proj}": (layer, i)
                      for layer in range(num_layers) for i, proj in enumerate(ALL_PROJECTIONS)}
        self.p = torch.zeros(num_tokens, num_layers, P, num_experts, device=device)
        self.scalar = torch.full((num_tokens, num_layers, P), float("nan"), device=device)

    def record(self, key: str, index, p: torch.Tensor, *, lam: torch.Tensor | None = None,
               threshold: torch.Tensor | None = None, u: torch.Tensor | None = None) -> None:
        layer, i = self.where[key]
        rows = slice(None) if index is None else index
        E = min(p.shape[-1], self.p.shape[-1])  # a kernel's p may be padded to the bank's widest set
        self.p[rows, layer, i, :E] = p[:, :E].float()
        scalar = lam if lam is not None else threshold
        if scalar is not None:
            self.scalar[rows, layer, i] = scalar.float()

    def read(self, rows: list[int]) -> list[RoutingEntry]:
        """The entries of these rows of the step, in one device-to-host copy."""
        idx = torch.tensor(rows, device=self.p.device, dtype=torch.long)
        n, L, P, E = len(rows), *self.p.shape[1:]
        both = torch.cat([self.p[idx].reshape(n, -1), self.scalar[idx].reshape(n, -1)], 1).cpu()
        p, scalar = both[:, :L * P * E].view(n, L, P, E), both[:, L * P * E:].view(n, L, P)
        return [RoutingEntry(p[j], scalar[j]) for j in range(n)]


def describe_set(slot) -> dict:
    """What a request's routing entries are about (the API sends it once per choice): the set's number
    of experts, its router and the projections it adapts, in ALL_PROJECTIONS order; or, for the bare
    base and single-expert sets, why there is no routing."""
    if slot is None:
        return {"none": "the bare base model routes no experts"}
    if slot.num_experts <= 1:
        return {"none": "this set has a single expert (plain LoRA): it routes nothing"}
    adapted = slot.config.target_modules if slot.config is not None else ALL_PROJECTIONS
    return {"experts": slot.num_experts, "router": slot.router_kind,
            "projections": [p for p in ALL_PROJECTIONS if p in adapted]}


def wants_routing(seq) -> bool:
    """A sequence whose request asked for routing and whose set routes (the bare base and plain-LoRA
    sets, E = 1, have none: the API says so instead)."""
    slot = None if seq.handle is None else seq.handle.slot
    return seq.params.routing is not None and slot is not None and slot.num_experts > 1
