"""The slot bank's geometry: how many sets it holds, and how big each set's slot is.

Every slot has the same shape, fixed when the bank is laid out: up to `experts` experts of rank up
to `rank`, over the projections `targets` (the union of what the bank's sets adapt). A set smaller
than its slot leaves the rest unused (zeros that no kernel reads), so a bank serving sets of one
shape (the usual case: one training recipe, many tasks) stores each at its own tensor size.

A set that does not fit the geometry (more experts, a higher rank, a projection no set adapted
before, a λ-network of a new width) makes the bank lay itself out again: the only time stored sets
are copied. A growable bank (no `--max-loras`) also doubles its slots when they run out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ldmole_runtime.adapters.spec import PROJECTION_GROUPS, AdapterConfig
from ldmole_runtime.lora.routing import ROUTERS


@dataclass(frozen=True)
class BankGeometry:
    capacity: int = 0  # slots: sets on the device at once
    experts: int = 0  # expert units per slot
    rank: int = 0  # rank rows per expert unit
    targets: frozenset[str] = frozenset()  # projections a slot may adapt
    lambda_hidden: int = 0  # λ-network width per slot (0: no set has one)
    lambda_widths: frozenset[int] = frozenset()  # input widths with a λ-network table
    router: bool = False  # router logit rows (not for plain LoRA, E = 1)
    threshold: bool = False  # AdaMoLE's threshold layers

    def fits(self, c: AdapterConfig) -> bool:
        router = ROUTERS[c.router]
        return (c.num_experts <= self.experts and c.rank <= self.rank and set(c.target_modules) <= self.targets
                and (not router.needs_lambda or (c.lambda_hidden <= self.lambda_hidden
                                                 and set(c.lambda_widths) <= self.lambda_widths))
                and (not router.needs_logits or self.router) and (not router.needs_threshold or self.threshold))

    def grown_for(self, c: AdapterConfig) -> BankGeometry:
        """The smallest geometry holding both this one's sets and a set of config c."""
        router = ROUTERS[c.router]
        lam = router.needs_lambda
        return replace(self, experts=max(self.experts, c.num_experts), rank=max(self.rank, c.rank),
                       targets=self.targets | set(c.target_modules),
                       lambda_hidden=max(self.lambda_hidden, c.lambda_hidden or 0) if lam else self.lambda_hidden,
                       lambda_widths=self.lambda_widths | (set(c.lambda_widths) if lam else set()),
                       router=self.router or router.needs_logits, threshold=self.threshold or router.needs_threshold)

    def group_projections(self, group: str) -> tuple[str, ...]:
        """The projections of a group that slots hold, in the fused weight's column order."""
        return tuple(p for p in PROJECTION_GROUPS[group] if p in self.targets)
