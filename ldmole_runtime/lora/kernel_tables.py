"""The bank's per-set facts as device tables, for kernels that serve every set in one launch.

A kernel program reads its block's set index, then everything else about the set from these rows:
where its experts sit on the global expert axis, how many there are, its router kind, scaling,
which projections of a group it adapts, and its λ-network (stacked over sets, hidden width
zero-padded to the widest: padded units are ReLU(0)·0 and add exact zeros). Built when sets are
added or removed (and after training steps change λ), never per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KernelTables:
    set_info: torch.Tensor  # [S, 5] int32: expert offset, E, router kind, top-k (0 when unused), rank
    scaling: torch.Tensor  # [S] fp32: alpha / r
    threshold_cap: torch.Tensor  # [S] fp32: AdaMoLE's τmax (0 for other routers)
    max_experts: int  # widest set's E: the p buffers' last axis
    masks: dict[str, torch.Tensor]  # group -> [S, P] fp32, 1 where the set adapts the projection
    # fan-in -> (w1 [S, H, in], b1 [S, H], w2 [S, H], b2 [S]) fp32; H = lambda_hidden
    lambdas: dict[int, tuple[torch.Tensor, ...]]
    lambda_hidden: int


def build_tables(bank) -> KernelTables:
    slots, device = bank.slots, bank.device
    S = len(slots)
    info = [(s.offset, s.num_experts, int(s.kernel_kind), s.router_options.get("k", 0), s.rank)
            for s in slots]
    masks = {}
    for group, gb in ((g, gb) for (layer, g), gb in bank.groups.items() if layer == 0):
        m = torch.zeros(S, len(gb.projections))
        for j, s in enumerate(slots):
            for i in s.adapted.get(group, ()):
                m[j, i] = 1.0
        masks[group] = m.to(device)
    widths = sorted({w for s in slots for w in s.lambda_nets})
    H = max((net[0].shape[0] for s in slots for net in s.lambda_nets.values()), default=1)
    lambdas = {}
    for w in widths:
        w1, b1, w2, b2 = (torch.zeros(S, H, w), torch.zeros(S, H), torch.zeros(S, H), torch.zeros(S))
        for j, s in enumerate(slots):
            if w in s.lambda_nets:
                net = [t.detach().float().cpu() for t in s.lambda_nets[w]]
                h = net[0].shape[0]
                w1[j, :h], b1[j, :h], w2[j, :h], b2[j] = net[0], net[1], net[2].reshape(-1), net[3].reshape(())
        lambdas[w] = tuple(t.to(device) for t in (w1, b1, w2, b2))
    return KernelTables(torch.tensor(info, dtype=torch.int32).reshape(S, 5).to(device),
                        torch.tensor([s.scaling for s in slots], dtype=torch.float32).to(device),
                        torch.tensor([s.threshold_cap for s in slots], dtype=torch.float32).to(device),
                        max((s.num_experts for s in slots), default=1), masks, lambdas, H)
