"""The bank's per-slot facts as device tables, for kernels that serve every set in one launch.

A kernel program reads its block's set index (a slot), then everything else about the set from
these rows: where its experts sit on the global expert axis, how many there are, its router kind,
scaling, which projections of a group it adapts, and its λ-network (the bank's own stacked λ
storage, hidden width zero-padded to the slot's: padded units are ReLU(0)·0 and add exact zeros).
Allocated with the bank's slots; a load or unload writes its own row, in place, so captured CUDA
graphs keep their pointers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KernelTables:
    set_info: torch.Tensor  # [S, 5] int32: expert offset, E (0: free slot), router kind, top-k (0 when unused), rank
    scaling: torch.Tensor  # [S] fp32: alpha / r
    threshold_cap: torch.Tensor  # [S] fp32: AdaMoLE's τmax (0 for other routers)
    max_experts: int  # expert units per slot: the p buffers' last axis
    masks: dict[str, torch.Tensor]  # group -> [S, P] fp32, 1 where the set adapts the projection
    # fan-in -> (w1 [S, H, in], b1 [S, H], w2 [S, H], b2 [S]) fp32; H = lambda_hidden
    lambdas: dict[int, tuple[torch.Tensor, ...]]
    lambda_hidden: int

    @classmethod
    def allocate(cls, capacity: int, max_experts: int, group_sizes: dict[str, int],
                 lambdas: dict[int, tuple[torch.Tensor, ...]], lambda_hidden: int, device) -> KernelTables:
        return cls(torch.zeros(capacity, 5, dtype=torch.int32, device=device),
                   torch.zeros(capacity, device=device), torch.zeros(capacity, device=device),
                   max(max_experts, 1), {g: torch.zeros(capacity, P, device=device) for g, P in group_sizes.items()},
                   lambdas, max(lambda_hidden, 1))

    def write(self, slot) -> None:
        """Slot `slot.index` now holds this set (λ rows are written by the bank, which owns them)."""
        s = slot.index
        info = (slot.offset, slot.num_experts, int(slot.kernel_kind), slot.router_options.get("k", 0), slot.rank)
        self.set_info[s] = torch.tensor(info, dtype=torch.int32)
        self.scaling[s] = slot.scaling
        self.threshold_cap[s] = slot.threshold_cap
        for group, mask in self.masks.items():
            mask[s] = 0.0
            for i in slot.adapted.get(group, ()):
                mask[s, i] = 1.0

    def clear(self, index: int) -> None:
        """A freed slot: no experts, adapts nothing (no block names it, but a stale row would lie)."""
        self.set_info[index] = 0
        for mask in self.masks.values():
            mask[index] = 0.0
