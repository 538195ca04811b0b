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

from dataclasses import dataclass, field

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
    # the kernels' per-step work buffers (expert weights p, shrink outputs h), shared by every layer and
    # group of the step: allocated with the step's metadata, never once per group
    scratch: dict = field(default_factory=dict, compare=False, repr=False)

    def scratch_buffer(self, name: str, numel: int, device: torch.device) -> torch.Tensor:
        """A flat fp32 buffer of at least numel elements, the same one for every caller of this step."""
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.scratch[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return buf

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


class AdapterBatchBuffers:
    """A step's adapter metadata in preallocated device buffers, filled in place (vLLM's
    LoRAKernelMeta). The model runner owns one: eager steps and CUDA-graph replays read the same
    tensors, so a captured graph finds each step's contents at the addresses it was captured with."""

    def __init__(self, max_tokens: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.sorted_tokens = torch.zeros(max_tokens, dtype=torch.long, device=self.device)
        self.blocks: torch.Tensor | None = None  # [block_capacity(max_tokens, num_sets), 3]
        self.num_sets = 0
        self.version = 0  # bumped when the buffers are reallocated (captured graphs then hold stale pointers)

    def fill(self, runs: list[tuple[int, int]], num_sets: int, static: bool = False) -> AdapterBatch:
        """The step's AdapterBatch, from (set index, token count) runs in token order, its tensors
        views of these buffers. `static` (a graph-replayed step): the block table keeps its full
        capacity even when no token is adapted, so the captured kernels always find one."""
        step = AdapterBatch.from_runs(runs, num_sets)  # worked out on the host
        n = step.num_tokens
        if num_sets == 0 or (step.blocks is None and not static):
            return AdapterBatch(n, ())
        self.reserve(n, num_sets)
        blocks = self.blocks[:block_capacity(n, num_sets)]
        if step.blocks is None:
            blocks.fill_(BASE)
            return AdapterBatch(n, (), self.sorted_tokens[:0], blocks)
        m = step.sorted_tokens.shape[0]
        _copy(self.sorted_tokens[:m], step.sorted_tokens)
        _copy(blocks, step.blocks)
        sorted_tokens = self.sorted_tokens[:m]
        segments, start = [], 0  # segments are stored set by set in sorted_tokens
        for seg in step.segments:
            rows = None if seg.index is None else sorted_tokens[start:start + seg.num_tokens]
            segments.append(Segment(seg.set_index, rows, seg.num_tokens))
            start += seg.num_tokens
        return AdapterBatch(n, tuple(segments), sorted_tokens, blocks)

    def reserve(self, num_tokens: int, num_sets: int) -> None:
        """Buffers for steps of up to num_tokens tokens over num_sets loaded sets."""
        if num_tokens > self.sorted_tokens.shape[0]:
            self.sorted_tokens = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
            self.blocks = None
        if self.blocks is None or num_sets != self.num_sets:
            capacity = block_capacity(self.sorted_tokens.shape[0], num_sets)
            self.blocks = torch.full((capacity, 3), BASE, dtype=torch.int32, device=self.device)
            self.num_sets = num_sets
            self.version += 1


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=dst.device.type == "cuda")
