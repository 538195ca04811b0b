"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts, prefix caching.

A full block is identified by a hash chained over every token before it *and the adapter set*:
LoRA on k/v changes the cache, so a prefix computed under one adapter set must never serve
another (or the bare base). Freed blocks keep their hash and stay reusable until they are evicted,
least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from ldmole_runtime.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class CacheStats:
    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # of those, found
    evictions: int = 0


def block_hash(prev: bytes, adapter_key: str, token_ids) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(adapter_key.encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.hashes: dict[int, list[bytes]] = {}  # seq_id -> hashes of its full, committed blocks
        self.stats = CacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ------------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Give a new sequence the cached blocks of its longest cached prefix; returns tokens reused.

        At least one token is always left to compute (its logits are needed), and tokens whose
        prompt logprobs are wanted must be computed, not read from the cache.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        limit = seq.num_tokens - 1
        if seq.next_prompt_logprob is not None:
            limit = min(limit, seq.next_prompt_logprob - 1)
        hashes: list[bytes] = []
        if self.enable_prefix_caching:
            prev, bs = b"", self.block_size
            for i in range(max(limit, 0) // bs):
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                prev = block_hash(prev, seq.adapter_key, tokens)
                block_id = self.cached.get(prev)
                if block_id is None or self.blocks[block_id].token_ids != tokens:
                    break
                self._take(block_id)
                seq.block_table.append(block_id)
                hashes.append(prev)
            self.stats.queried_tokens += seq.num_prompt_tokens
            self.stats.hit_tokens += len(hashes) * bs
        self.hashes[seq.seq_id] = hashes
        seq.num_computed_tokens = seq.num_cached_tokens = len(hashes) * self.block_size
        return seq.num_cached_tokens

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that the last step filled, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        hashes = self.hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        for i in range(len(hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(hashes[-1] if hashes else b"", seq.adapter_key, tokens)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.cached.setdefault(h, block.block_id)  # an identical block computed concurrently stays the one served

    def fork(self, parent: Sequence, child: Sequence, copy_block) -> bool:
        """Give `child` the KV of everything `parent` has computed: full blocks are shared (reference
        counts), the partial last block is copied with copy_block(src, dst), since the child will
        write its own tokens after it. False, changing nothing, if no block is free for the copy."""
        bs = self.block_size
        full, partial = divmod(parent.num_computed_tokens, bs)
        if partial and not self.free:
            return False
        for block_id in parent.block_table[:full]:
            self._take(block_id)
            child.block_table.append(block_id)
        if partial:
            block_id = next(iter(self.free))
            self._evict(block_id)
            self._take(block_id)
            copy_block(parent.block_table[full], block_id)
            child.block_table.append(block_id)
        child.num_computed_tokens = child.num_cached_tokens = parent.num_computed_tokens
        self.hashes[child.seq_id] = list(self.hashes.get(parent.seq_id, []))[:full]
        return True

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the sequence's block table to hold num_tokens tokens; False if blocks ran out."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            block_id = next(iter(self.free))
            self._evict(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
        return True

    def release(self, seq: Sequence) -> None:
        # the tail of a sequence is the least likely to be shared: free it first so it is evicted first
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        self.hashes.pop(seq.seq_id, None)

    def ownership_errors(self, owners) -> list[str]:
        """What breaks the invariant "a block is in use exactly as often as live sequences' block
        tables name it, and free exactly when none does", for `owners` (every running, waiting and
        held sequence). Empty when it holds."""
        uses = [0] * self.num_blocks
        for seq in owners:
            for block_id in seq.block_table:
                uses[block_id] += 1
        errors = [f"block {b.block_id}: ref_count {b.ref_count}, named by {uses[b.block_id]} live sequence(s)"
                  for b in self.blocks if b.ref_count != uses[b.block_id]]
        errors += [f"block {b.block_id}: ref_count {b.ref_count} but on the free list"
                   for b in self.blocks if (b.ref_count == 0) != (b.block_id in self.free)]
        return errors

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
                self.stats.evictions += 1
            block.hash, block.token_ids = None, ()
