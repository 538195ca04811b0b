"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Every step has a token budget. Running sequences come first (a decode costs one token, an
unfinished prompt continues in chunks), then waiting ones are admitted in arrival order. When the
KV cache runs out, the newest running sequence is preempted: its blocks are freed and it goes back
to the front of the queue, to be recomputed from its tokens later. Nothing is ever dropped. A
waiting sequence holds blocks only until the head of the queue needs them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ldmole_runtime.engine.block_manager import BlockManager
from ldmole_runtime.engine.sequence import Sequence, Status


@dataclass
class SchedulerStats:
    preemptions: int = 0
    steps: int = 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()
        # sequences the last schedule() could not place because placing them raised (a fault, not a full
        # cache): taken out, so that the fault fails their requests alone, not the whole batch
        self.faults: list[tuple[Sequence, Exception]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's batch: (sequence, tokens to compute) pairs."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        self.faults = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.remaining_prefill, budget)
            try:
                while not self.bm.allocate(seq, seq.num_computed_tokens + n):
                    victim = self.running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                else:
                    batch.append((seq, n))
                    budget -= n
                    i += 1
            except Exception as exc:  # noqa: BLE001 - contained: this sequence fails, the step goes on
                self._fault(seq, exc)
        # admitting new work right after a preemption would only thrash the cache
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            try:
                n = self._blocks_for(seq, budget)
            except Exception as exc:  # noqa: BLE001 - contained: this sequence fails, the queue goes on
                self._fault(seq, exc)
                continue
            if n is None:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.stats.steps += 1
        return batch

    def _blocks_for(self, seq: Sequence, budget: int) -> int | None:
        """The tokens the head of the queue computes this step, its blocks allocated; None if the
        cache cannot hold them even after every waiting sequence has let go of its blocks."""
        for unpinned in (False, True):
            if not seq.block_table:
                self.bm.match_prefix(seq)
            n = min(seq.remaining_prefill, budget)
            if self.bm.allocate(seq, seq.num_computed_tokens + n):
                return n
            self.bm.release(seq)  # do not hold cache blocks while waiting
            if unpinned or not self._unpin_waiting():
                return None
        return None

    def _unpin_waiting(self) -> bool:
        """Free the blocks of waiting sequences (a fork of a held context takes a copied block when it
        is queued). Only running sequences can be preempted, so forks queued behind a head that cannot
        allocate would otherwise pin the cache for good. They recompute what they lose; the prefix
        cache finds the shared part again."""
        pinned = [s for s in self.waiting if s.block_table]
        for s in pinned:
            self.bm.release(s)
        return bool(pinned)

    def _fault(self, seq: Sequence, exc: Exception) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        try:
            self.bm.release(seq)
        except Exception:  # noqa: BLE001 - its blocks may be what broke; the block check reports them
            seq.block_table = []
        seq.status = Status.FINISHED
        seq.finish_reason = "error"
        self.faults.append((seq, exc))

    def _preempt(self, seq: Sequence) -> None:
        self.bm.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def finish(self, seq: Sequence, reason: str, release: bool = True) -> None:
        """release=False keeps the KV blocks (a held context, to be forked); the caller frees them."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if release:
            self.bm.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
