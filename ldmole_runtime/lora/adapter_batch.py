"""Per-forward adapter metadata: which tokens belong to which adapter set.

Every token carries an adapter-set index (-1: the bare base). Routing runs per set, so the tokens
are grouped into one segment per set present. This is built once per forward with tensor ops and a
single host sync (the segment sizes), then reused by every adapted projection of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LDMoleError

BASE = -1  # the adapter-set index of tokens that run on the bare base model


@dataclass(frozen=True)
class Segment:
    set_index: int
    index: torch.Tensor | None  # token rows of this set; None when the set owns every token
    num_tokens: int


@dataclass(frozen=True)
class AdapterBatch:
    num_tokens: int
    segments: tuple[Segment, ...]

    @property
    def is_bare(self) -> bool:
        return not self.segments

    @classmethod
    def build(cls, set_ids: torch.Tensor, num_sets: int) -> "AdapterBatch":
        set_ids = set_ids.reshape(-1)
        n = set_ids.numel()
        if n == 0:
            return cls(0, ())
        lo, hi = int(set_ids.min()), int(set_ids.max())
        if lo < BASE or hi >= num_sets:
            raise LDMoleError(f"adapter-set index out of range [{BASE}, {num_sets - 1}]: found {lo if lo < BASE else hi}")
        if lo == hi:
            return cls(n, () if lo == BASE else (Segment(lo, None, n),))
        order = torch.argsort(set_ids, stable=True)
        ids, counts = torch.unique_consecutive(set_ids[order], return_counts=True)
        segments, start = [], 0
        for set_index, count in zip(ids.tolist(), counts.tolist()):
            if set_index != BASE:
                segments.append(Segment(set_index, order[start:start + count], count))
            start += count
        return cls(n, tuple(segments))
