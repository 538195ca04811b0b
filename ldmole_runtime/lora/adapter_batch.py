"""Per-forward adapter metadata: which tokens belong to which adapter set, built once on the host.

Every token carries an adapter-set index (-1: the bare base). The caller knows these on the host
(the model runner: one set per sequence), so everything every layer needs is derived there, with
no device→host sync, and copied to the device once per forward:

* `segments`: per set present, its token rows (for backends that route one set at a time);
* `sorted_tokens` [M] int64: the rows of all adapted tokens, grouped by set (bare-base rows left
  out);
* `blocks` [capacity, 3] int32: (set, start, end) into `sorted_tokens`, at most `TOKEN_BLOCK`
  tokens of one set each: one program of a Triton kernel each. The capacity depends only on the
  token count and the number of loaded sets, and unused rows have set -1, so a captured CUDA graph
  can replay with new contents in the same buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmole_runtime.errors import LDMoleError

BASE = -1  # the adapter-set index of tokens that run on the bare base model
TOKEN_BLOCK = 16  # tokens per kernel program; the Triton kernels' BLOCK_M (tl.dot wants >= 16)


def block_capacity(num_tokens: int, num_sets: int) -> int:
    """Rows of a step's block table: every set's last block may be partial, so at most one extra row
    per set; fixed by the token count and the loaded sets alone (a captured graph's buffers)."""
    return -(-num_tokens // TOKEN_BLOCK) + min(num_tokens, num_sets)


@dataclass(frozen=True)
class Segment:
    set_index: int
    index: torch.Tensor | None  # token rows of this set; None when the set owns every token
    num_tokens: int


@dataclass(frozen=True)
class AdapterBatch:
    num_tokens: int
    segments: tuple[Segment, ...]
    sorted_tokens: torch.Tensor | None = None  # [M] rows of adapted tokens, grouped by set
    blocks: torch.Tensor | None = None  # [capacity, 3] (set, start, end) into sorted_tokens

    @property
    def is_bare(self) -> bool:
        """No adapted token (a static decode step's buffers count as adapted: their contents vary)."""
        return self.blocks is None

    @classmethod
    def from_runs(cls, runs: list[tuple[int, int]], num_sets: int,
                  device: torch.device | str = "cpu") -> AdapterBatch:
        """From (set index, token count) runs in token order, e.g. one run per sequence of a step."""
        n = sum(count for _, count in runs)
        for set_index, _ in runs:
            if not BASE <= set_index < num_sets:
                raise LDMoleError(f"adapter-set index out of range [{BASE}, {num_sets - 1}]: found {set_index}")
        present = sorted({s for s, c in runs if s != BASE and c})
        if not present:
            return cls(n, ())
        starts = torch.tensor([0] + [c for _, c in runs]).cumsum(0)[:-1]
        run_sets = torch.tensor([s for s, _ in runs])
        run_counts = torch.tensor([c for _, c in runs])
        order = torch.argsort(run_sets, stable=True)
        order = order[run_sets[order] != BASE]
        counts = run_counts[order]
        # rows of the adapted runs, set by set: each run's start repeated, plus its offset within
        offsets = torch.cumsum(counts, 0) - counts
        sorted_rows = torch.repeat_interleave(starts[order] - offsets, counts) + torch.arange(int(counts.sum()))
        per_set = {s: sum(c for r, c in runs if r == s) for s in present}
        blocks, start = [], 0
        for s in present:
            for lo in range(start, start + per_set[s], TOKEN_BLOCK):
                blocks.append((s, lo, min(lo + TOKEN_BLOCK, start + per_set[s])))
            start += per_set[s]
        blocks += [(BASE, 0, 0)] * (block_capacity(n, num_sets) - len(blocks))

        device = torch.device(device)
        pin = device.type == "cuda"
        sorted_tokens = _to_device(sorted_rows, device, pin)
        block_table = _to_device(torch.tensor(blocks, dtype=torch.int32), device, pin)
        if len(present) == 1 and per_set[present[0]] == n:
            segments = (Segment(present[0], None, n),)
        else:
            segments, start = [], 0
            for s in present:
                segments.append(Segment(s, sorted_tokens[start:start + per_set[s]], per_set[s]))
                start += per_set[s]
        return cls(n, tuple(segments), sorted_tokens, block_table)

    @classmethod
    def build(cls, set_ids: torch.Tensor, num_sets: int) -> AdapterBatch:
        """From a per-token index tensor (any shape): reads it on the host once, before the forward."""
        flat = set_ids.reshape(-1).cpu()
        if flat.numel() == 0:
            return cls(0, ())
        values, counts = torch.unique_consecutive(flat, return_counts=True)
        return cls.from_runs(list(zip(values.tolist(), counts.tolist(), strict=True)), num_sets, set_ids.device)


def _to_device(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if device.type == "cpu":
        return t
    return (t.pin_memory() if pin else t).to(device, non_blocking=True)
