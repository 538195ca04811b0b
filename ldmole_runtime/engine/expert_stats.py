"""How many experts each token actually uses, sampled cheaply for the serving metrics.

On a sampled step the forward gets an `ActiveExpertCount` in place of a routing capture: every
adapted projection adds its count of p > 0 per token into two device tensors (no host sync). After
the step, one bucketize + bincount turns the per-token means into histogram counts per adapter set,
read back with a single sync. Unsampled steps pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Upper bounds (Prometheus `le`) of the histogram of mean active experts per token.
BUCKETS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 12.0, 16.0, 32.0, 64.0)


class ActiveExpertCount:
    """Duck-types RoutingCapture.record: sums active experts and routing decisions per token."""

    def __init__(self, num_tokens: int, device):
        self.active = torch.zeros(num_tokens, device=device)
        self.decisions = torch.zeros(num_tokens, device=device)

    def record(self, key: str, index, p: torch.Tensor, **_) -> None:  # a RoutingSink; λ, thresholds, logits unused
        active = (p > 0).sum(-1).float()
        if index is None:
            self.active += active
            self.decisions += 1
        else:
            self.active.index_add_(0, index, active)
            self.decisions.index_add_(0, index, torch.ones_like(active))

    def per_token_mean(self) -> torch.Tensor:
        """[N] mean active experts per routing decision; 0 for tokens no adapter routed (the base)."""
        return self.active / self.decisions.clamp(min=1)


@dataclass
class ExpertHistogram:
    """Cumulative histogram per adapter-set name: bucket counts (non-cumulative), sum and count."""
    buckets: tuple[float, ...] = BUCKETS
    by_adapter: dict[str, list] = field(default_factory=dict)  # name -> [counts per bucket + overflow, sum, count]
    max_names: int = 64  # sets with their own series; the rest share "other" (a scrape stays bounded)

    def add(self, means: torch.Tensor, set_ids: torch.Tensor, names: list[str | None]) -> None:
        """`names`: the set name of each kernel set index (None: a free slot)."""
        routed = set_ids >= 0
        if not names or not bool(routed.any()):
            return
        means, set_ids = means[routed], set_ids[routed]
        nb = len(self.buckets) + 1
        edges = torch.tensor(self.buckets, device=means.device)
        bucket = torch.bucketize(means, edges)  # index of the first edge >= value: Prometheus' `le`
        counts = torch.bincount(set_ids * nb + bucket, minlength=len(names) * nb).view(len(names), nb)
        sums = torch.zeros(len(names), device=means.device).index_add_(0, set_ids, means)
        for name, row, total in zip(names, counts.tolist(), sums.tolist(), strict=True):
            n = sum(row)
            if n and name is not None:
                if name not in self.by_adapter and len(self.by_adapter) >= self.max_names:
                    name = "other"
                entry = self.by_adapter.setdefault(name, [[0] * nb, 0.0, 0])
                entry[0] = [a + b for a, b in zip(entry[0], row, strict=True)]
                entry[1] += total
                entry[2] += n
