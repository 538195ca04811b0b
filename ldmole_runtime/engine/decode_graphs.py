"""Decode steps from static buffers, replayed as CUDA graphs on a GPU.

A decode step of B sequences (one new token each) is padded to the next batch bucket; its inputs
and its attention metadata (KV slots, block tables, context lengths) are written into that
bucket's preallocated buffers, the adapters' metadata into the model runner's adapter buffers (the
same ones its eager steps use), and the runner's one forward that reads them is captured once per
(batch bucket, block-table width bucket) and replayed. Launching ~1,000 kernels
one by one costs more than running them at small batch; a replay is one launch.

Padding rows are bare-base tokens at position 0 that write their k/v into a scratch block beyond
the block manager's blocks, so they never touch a real sequence. The adapters' metadata has a
capacity that depends only on the bucket and the number of loaded sets; the graphs are dropped
whenever the bank or the adapter buffers change (their tensors move).

`mode="eager"` runs the same static-buffer step without capturing: that is how CPU tests prove
the padding and metadata plumbing equal the dynamic path, which a GPU then only has to replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmole_runtime.lora.adapter_batch import BASE, AdapterBatch
from ldmole_runtime.model.attention import PagedAttention

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class _Buffers:
    input_ids: torch.Tensor  # [Bp]
    positions: torch.Tensor  # [Bp]
    slots: torch.Tensor  # [Bp] KV slot of each new token
    tables: torch.Tensor  # [Bp, W] block tables
    lens: torch.Tensor  # [Bp] context lengths
    mask: torch.Tensor  # [Bp, 1, 1, W * block_size] keys each query may see (filled inside the step)
    adapters: AdapterBatch | None = None  # views of the runner's adapter buffers, filled each step
    hidden: torch.Tensor | None = None  # the step's output (a graph's static output)
    graph: object = None


class DecodeGraphs:
    def __init__(self, runner, mode: str = "graph"):
        self.runner, self.mode = runner, mode
        rt = runner.runtime
        self.max_width = runner.max_blocks_per_seq
        self.scratch_slot = runner.num_blocks * runner.block_size  # first slot of the scratch block
        self.scratch_block = runner.num_blocks
        self.buffers: dict[tuple[int, int], _Buffers] = {}
        self.versions = (rt.bank.version, runner.adapter_buffers.version)
        self.pool = torch.cuda.graph_pool_handle() if mode == "graph" else None

    def bucket(self, batch_size: int, width: int) -> tuple[int, int] | None:
        if batch_size > BATCH_BUCKETS[-1]:
            return None
        bp = next(b for b in BATCH_BUCKETS if b >= batch_size)
        return bp, min(1 << max(0, width - 1).bit_length(), self.max_width)

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            set_ids: list[int]) -> torch.Tensor | None:
        """Hidden states [B, hidden] of one decode step, or None when it does not fit a bucket."""
        B = len(token_ids)
        key = self.bucket(B, max(len(t) for t in tables))
        if key is None:
            return None
        bank, adapter_buffers = self.runner.runtime.bank, self.runner.adapter_buffers
        adapter_buffers.reserve(BATCH_BUCKETS[-1], bank.capacity)
        if (bank.version, adapter_buffers.version) != self.versions:  # new tensors: every captured pointer is stale
            self.buffers.clear()
            self.versions = (bank.version, adapter_buffers.version)
        bufs = self.buffers.get(key) or self._new_buffers(*key)
        self._fill(bufs, key, token_ids, positions, slots, tables, set_ids)
        if self.mode == "eager":
            return self._forward(bufs)[:B]
        if bufs.graph is None:
            self._capture(bufs)
        bufs.graph.replay()
        return bufs.hidden[:B]

    # ---- buffers ----------------------------------------------------------------------------------
    def _new_buffers(self, bp: int, width: int) -> _Buffers:
        device, bs = self.runner.runtime.device, self.runner.block_size
        long = dict(dtype=torch.long, device=device)
        bufs = _Buffers(torch.zeros(bp, **long), torch.zeros(bp, **long), torch.full((bp,), self.scratch_slot, **long),
                        torch.full((bp, width), self.scratch_block, **long), torch.ones(bp, **long),
                        torch.zeros(bp, 1, 1, width * bs, dtype=torch.bool, device=device))
        self.buffers[(bp, width)] = bufs
        return bufs

    def _fill(self, bufs: _Buffers, key, token_ids, positions, slots, tables, set_ids) -> None:
        bp, width = key
        B = len(token_ids)
        pad = bp - B
        host = torch.tensor([token_ids + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad,
                             [p + 1 for p in positions] + [1] * pad])
        rows = [t + [self.scratch_block] * (width - len(t)) for t in tables] + [[self.scratch_block] * width] * pad
        for dst, src in zip((bufs.input_ids, bufs.positions, bufs.slots, bufs.lens), host, strict=True):
            dst.copy_(src, non_blocking=True)
        bufs.tables.copy_(torch.tensor(rows), non_blocking=True)
        bufs.adapters = self.runner.adapter_buffers.fill([(s, 1) for s in set_ids] + [(BASE, pad)],
                                                         self.runner.runtime.bank.capacity, static=True)

    # ---- the step ---------------------------------------------------------------------------------
    def _forward(self, bufs: _Buffers) -> torch.Tensor:
        runner = self.runner
        bp, width = bufs.tables.shape
        keys = torch.arange(width * runner.block_size, device=bufs.lens.device)
        torch.lt(keys[None, :], bufs.lens[:, None], out=bufs.mask.view(bp, -1))
        attention = PagedAttention(runner.kv_cache, bufs.slots, torch.arange(bp, device=bufs.lens.device),
                                   bufs.tables, bufs.mask, bufs.lens, [], None)
        return runner.forward(bufs.input_ids, bufs.positions, attention, bufs.adapters)

    def _capture(self, bufs: _Buffers) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels and settles the allocator outside the capture
                self._forward(bufs)
        torch.cuda.current_stream().wait_stream(stream)
        bufs.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bufs.graph, pool=self.pool):
            bufs.hidden = self._forward(bufs)
