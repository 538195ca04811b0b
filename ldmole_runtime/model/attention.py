"""Attention backends. The decoder hands every backend flat token rows:

    q [N, H, head_dim], k and v [N, H_kv, head_dim]  ->  out [N, H * head_dim]

so the model does not care whether rows are whole sequences of equal length (a full forward) or
chunks of sequences whose earlier tokens live in a paged KV cache (the engine).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ldmole_kernels.cpu_kernels import cpu_kernels
from ldmole_runtime.paths import default_cache_dir


class AttentionBackend(Protocol):
    """What an attention layer asks of the forward: its output for this layer's q, k, v (flat tokens:
    q [N, H, D], k and v [N, H_kv, D] -> [N, H * D]), wherever the keys and values are kept."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DenseCausalAttention:
    """B unpadded rows of T tokens each, laid out row after row; no cache."""
    batch_size: int
    seq_len: int

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T = self.batch_size, self.seq_len
        q, k, v = (t.view(B, T, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2).reshape(B * T, -1)


@dataclass
class PagedAttention:
    """Rows are chunks of sequences whose earlier tokens are already in a paged KV cache.

    kv_cache is [layers, 2, num_blocks, block_size, H_kv, head_dim]. Each step first writes the new
    k/v at `slot_mapping`, then every query attends over its sequence's cached keys. Decodes (one
    query each) are read straight from the cache by a C kernel on the CPU (kernels/cpu/paged_decode.c),
    elsewhere batched into one padded SDPA call; so are short prompt chunks (scoring's
    forks, small prompts: many per step, where one call each would cost more in dispatch than in
    math); long prompt chunks run one call each, so no padding is wasted on them.
    """
    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor  # [N] flat cache slot of every new token
    decode_rows: torch.Tensor | None  # [Bd] token rows of single-token sequences
    decode_blocks: torch.Tensor | None  # [Bd, max_blocks] their block tables (padded)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, max_blocks * block_size] valid keys
    decode_lens: torch.Tensor | None  # [Bd] int64 context lengths (the new token included)
    prefills: list[tuple[int, int, torch.Tensor, int]]  # (first row, query len, block ids, context len)
    short: _ShortPrefills | None = None

    # a prompt chunk this small joins the padded batch (bounds its score tensor to B x H x 32 x 512)
    SHORT_QUERY, SHORT_CONTEXT = 32, 512

    @classmethod
    def build(cls, kv_cache: torch.Tensor, q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
              slot_mapping: torch.Tensor) -> PagedAttention:
        device, block_size = kv_cache.device, kv_cache.shape[3]
        starts = [0]
        for n in q_lens[:-1]:
            starts.append(starts[-1] + n)
        decodes = [i for i, n in enumerate(q_lens) if n == 1]
        short = [i for i, n in enumerate(q_lens) if 1 < n <= cls.SHORT_QUERY and ctx_lens[i] <= cls.SHORT_CONTEXT]
        if len(short) < 2:
            short = []
        prefills = [(starts[i], q_lens[i], torch.tensor(block_tables[i], device=device), ctx_lens[i])
                    for i, n in enumerate(q_lens) if n > 1 and i not in set(short)]
        rows = blocks = mask = lens = None
        if decodes:
            width = max(len(block_tables[i]) for i in decodes)
            rows = torch.tensor([starts[i] for i in decodes], device=device)
            blocks = torch.tensor(
                [block_tables[i] + [0] * (width - len(block_tables[i])) for i in decodes], device=device
            )
            lens = torch.tensor([ctx_lens[i] for i in decodes], device=device)
            mask = (torch.arange(width * block_size, device=device) < lens[:, None])[:, None, None, :]
        batch = _ShortPrefills.build([starts[i] for i in short], [q_lens[i] for i in short],
                                     [ctx_lens[i] for i in short], [block_tables[i] for i in short],
                                     block_size, device) if short else None
        return cls(kv_cache, slot_mapping, rows, blocks, mask, lens, prefills, batch)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N, H, D = q.shape
        k_cache, v_cache = self.kv_cache[layer, 0], self.kv_cache[layer, 1]  # [blocks, block_size, H_kv, D]
        H_kv = k_cache.shape[2]
        k_cache.view(-1, H_kv, D).index_copy_(0, self.slot_mapping, k)
        v_cache.view(-1, H_kv, D).index_copy_(0, self.slot_mapping, v)
        gqa = H_kv != H
        out = q.new_empty(N, H, D)
        if self.decode_rows is not None and (lib := self._decode_kernel(q)) is not None:
            lib.ldmole_paged_decode(int(q.dtype == torch.bfloat16), self.decode_rows.shape[0],
                                    self.decode_rows.data_ptr(), q.data_ptr(), H, D, k_cache.data_ptr(),
                                    v_cache.data_ptr(), k_cache.shape[1], H_kv, self.decode_blocks.data_ptr(),
                                    self.decode_blocks.shape[1], self.decode_lens.data_ptr(), 1.0 / math.sqrt(D),
                                    out.data_ptr())
        elif self.decode_rows is not None:
            B = self.decode_rows.shape[0]
            keys = k_cache[self.decode_blocks].view(B, -1, H_kv, D).transpose(1, 2)
            values = v_cache[self.decode_blocks].view(B, -1, H_kv, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[self.decode_rows].unsqueeze(2), keys, values,
                                               attn_mask=self.decode_mask, enable_gqa=gqa)
            out[self.decode_rows] = o.squeeze(2)
        if self.short is not None:
            s = self.short
            B = s.blocks.shape[0]
            keys = k_cache[s.blocks].view(B, -1, H_kv, D).transpose(1, 2)
            values = v_cache[s.blocks].view(B, -1, H_kv, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[s.rows].transpose(1, 2), keys, values, attn_mask=s.mask,
                                               enable_gqa=gqa)
            out[s.rows[s.valid]] = o.transpose(1, 2)[s.valid]
        for start, q_len, blocks, ctx_len in self.prefills:
            keys = k_cache[blocks].view(-1, H_kv, D)[:ctx_len].transpose(0, 1)
            values = v_cache[blocks].view(-1, H_kv, D)[:ctx_len].transpose(0, 1)
            queries = q[start:start + q_len].transpose(0, 1)
            if ctx_len == q_len:
                o = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=gqa)
            else:  # a later chunk: query i sits at position ctx_len - q_len + i
                allowed = (torch.arange(ctx_len, device=q.device)[None, :]
                           <= torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None])
                o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, enable_gqa=gqa)
            out[start:start + q_len] = o.transpose(0, 1)
        return out.view(N, H * D)

    def _decode_kernel(self, q: torch.Tensor):
        """The C library when it can serve this step's decode attention (CPU, fp32 or bf16, no autograd)."""
        if (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16) or self.kv_cache.dtype != q.dtype
                or not q.is_contiguous() or not self.kv_cache.is_contiguous() or torch.is_grad_enabled()
                or self.decode_lens is None or not all(t.dtype == torch.int64 for t in (
                    self.decode_rows, self.decode_blocks, self.decode_lens))):
            return None
        return _cpu_library()


@functools.cache
def _cpu_library():
    return cpu_kernels(default_cache_dir() / "kernels")


@dataclass
class _ShortPrefills:
    """Short prompt chunks as one padded batch: B chunks of up to Q queries over up to K keys."""
    rows: torch.Tensor  # [B, Q] token row of each query (0 for padding)
    valid: torch.Tensor  # [B, Q] real queries
    blocks: torch.Tensor  # [B, max_blocks] block tables (padded)
    mask: torch.Tensor  # [B, 1, Q, K] keys each query may see

    @classmethod
    def build(cls, starts, q_lens, ctx_lens, tables, block_size: int, device) -> _ShortPrefills:
        width = max(len(t) for t in tables)
        q_len, ctx_len = torch.tensor(q_lens, device=device), torch.tensor(ctx_lens, device=device)
        i = torch.arange(max(q_lens), device=device)
        valid = i[None, :] < q_len[:, None]
        rows = torch.where(valid, torch.tensor(starts, device=device)[:, None] + i[None, :], 0)
        position = (ctx_len - q_len)[:, None] + i[None, :]  # query i sits at position ctx_len - q_len + i
        j = torch.arange(width * block_size, device=device)
        mask = (j[None, None, :] <= position[:, :, None]) & (j[None, None, :] < ctx_len[:, None, None])
        mask |= ~valid[:, :, None] & (j == 0)  # a padding query sees one key, so its softmax stays finite
        blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
        return cls(rows, valid, blocks, mask[:, None])
