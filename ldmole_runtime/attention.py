"""Attention backends. The decoder hands every backend flat token rows:

    q [N, H, head_dim], k and v [N, H_kv, head_dim]  ->  out [N, H * head_dim]

so the model does not care whether rows are whole sequences of equal length (a full forward) or
chunks of sequences whose earlier tokens live in a paged KV cache (the engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
