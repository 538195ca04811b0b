"""Llama / Qwen3 decoder with LD-MoLE adapters, written to read top to bottom.

Token activations travel as one flat [N, hidden] matrix, so adapted projections see rows of tokens
whatever the batch shape. q/k/v and gate/up are fused into one base weight each: the base matmul,
the λ-network and the router logits of a group are computed once for its shared input. Attention
reshapes to [B, H, T, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank
from ldmole_runtime.lora.capture import RoutingSink
from ldmole_runtime.lora.ops import LoraBackend, select_lora_backend
from ldmole_runtime.lora.ops.step import LoraStep
from ldmole_runtime.model.attention import AttentionBackend
from ldmole_runtime.model.config import ModelConfig


@dataclass
class ForwardContext:
    """What every adapted projection needs to know about the current forward."""
    batch: AdapterBatch
    bank: AdapterBank | None
    attention: AttentionBackend
    # a LoRA backend, or its name: "sparse" (serving), "dense" (the torch reference), ...
    lora_backend: LoraBackend | str = "sparse"
    capture: RoutingSink | None = None
    dropout: float = 0.0  # adapters' input dropout, training only

    def __post_init__(self):
        if isinstance(self.lora_backend, str):
            device = "cpu" if self.bank is None else self.bank.device
            self.lora_backend = select_lora_backend(self.lora_backend, device)
        # what the layers call
        self.lora = LoraStep(self.lora_backend, self.bank, self.batch, self.capture, self.dropout)


def _param(*shape: int) -> nn.Parameter:
    # weights are always overwritten by the loader: skip the random init
    return nn.Parameter(torch.empty(*shape))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE; scaled variants (linear, llama3, yarn, ...) use transformers' own frequency functions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        params = getattr(cfg.hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(cfg.hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg.hf_config, "cpu")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos/sin [N, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class AdaptedLinear(nn.Module):
    """A fused base projection group (q/k/v, o, gate/up or down) plus the adapters' mixture delta."""

    def __init__(self, layer: int, group: str, fan_in: int, fan_outs: tuple[int, ...], bias: bool):
        super().__init__()
        self.layer, self.group, self.fan_outs = layer, group, fan_outs
        self.key = (layer, group)  # the bank's group of this projection
        self.weight = _param(sum(fan_outs), fan_in)
        self.bias = _param(sum(fan_outs)) if bias else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        ctx.lora.apply(y, x, self.key)
        return y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = AdaptedLinear(
            layer, "qkv", cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size), cfg.attention_bias
        )
        self.o = AdaptedLinear(layer, "o", cfg.q_size, (cfg.hidden_size,), cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        N, H, H_kv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x, ctx)
        v = qkv[:, (H + H_kv) * D:].view(N, H_kv, D)
        if self.q_norm is None:  # q and k lie side by side in the fused output: one rotation for both
            qk = apply_rope(qkv[:, :(H + H_kv) * D].view(N, H + H_kv, D), *rope)
            q, k = qk[:, :H].contiguous(), qk[:, H:]
        else:
            q, k = qkv[:, :H * D].view(N, H, D), qkv[:, H * D:(H + H_kv) * D].view(N, H_kv, D)
            q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        return self.o(ctx.attention.attend(self.layer, q, k, v), ctx)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up = AdaptedLinear(layer, "gate_up", cfg.hidden_size, (inter, inter), cfg.mlp_bias)
        self.down = AdaptedLinear(layer, "down", inter, (cfg.hidden_size,), cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate, up = self.gate_up(x, ctx).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up, ctx)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, x, rope, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), rope, ctx)
        return x + self.mlp(self.post_attention_norm(x), ctx)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # a classifier checkpoint has a `score` head and no LM head
        self.lm_head = (
            None if cfg.num_labels is not None or cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size)
        )
        self.score = _param(cfg.num_labels, cfg.hidden_size) if cfg.num_labels is not None else None

    @property
    def lm_head_weight(self) -> torch.Tensor | None:
        if self.cfg.num_labels is not None:
            return None
        return self.embed.weight if self.lm_head is None else self.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Flat tokens: input_ids [N] at positions [N] -> final hidden states [N, hidden]."""
        x = self.embed(input_ids)
        rope = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, ctx)
        return self.norm(x)
