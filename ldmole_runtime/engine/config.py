"""The engine's settings, and their one resolution against a loaded model.

`EngineConfig()` holds the defaults that `ldmole serve`, `lm_eval --model ldmole` and `LLM` all
read. `resolve` works out, once, everything that depends on the model: the context length, the
KV-cache block count, the end-of-sequence ids and the vocabulary size; the engine and its model
runner then take the resolved config whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ldmole_runtime.engine.memory import MemoryReserve, kv_bytes_within
from ldmole_runtime.errors import LDMoleError


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: as many as kv_cache_gib holds (at least one max_model_len sequence)
    kv_cache_gib: float = 1.0
    # the engine's memory in all (base weights, adapter slots, host cache of sets on a CPU, KV cache): when set, the
    # KV cache gets what the rest leaves (engine/memory.py), and kv_cache_gib is not used
    memory_gib: float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # None: the base model's max_position_embeddings
    enable_prefix_caching: bool = True
    # one of lora.ops.LORA_BACKENDS: "sparse" (the fastest for the device), "dense" (the torch reference), or a
    # backend by name
    lora_backend: str = "sparse"
    # decode steps from static buffers: "auto" replays CUDA graphs on a GPU with the triton backend;
    # "off" never; "eager" runs the static-buffer step without capture (tests prove it on CPU)
    decode_graphs: str = "auto"
    expert_sample_every: int = 16  # count active experts per token on every N-th step (0: never), for metrics
    check_blocks: bool = False  # after every step, check that each used KV block belongs to a live sequence (debug)
    # adapter tiers (engine/adapter_cache.py): sets on the device at once (None: as many as are loaded, the bank
    # grows), more sets kept read in host memory, a folder whose subfolders are servable sets, sets never evicted
    max_loras: int | None = None
    max_cpu_loras: int = 0
    adapter_dir: str | None = None
    pinned_adapters: tuple[str, ...] = ()
    # worked out by `resolve` from the model (and the tokenizer):
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    vocab_size: int | None = None

    def resolve(self, runtime, tokenizer=None, reserve: MemoryReserve | None = None) -> EngineConfig:
        """A copy with every model-dependent value filled in and checked (`reserve`: what the engine holds
        besides the KV cache, needed with memory_gib)."""
        cfg = runtime.cfg
        max_model_len = min(self.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        block_bytes = (2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim
                       * torch.empty((), dtype=runtime.dtype).element_size())
        if self.memory_gib is not None and self.num_blocks is None:
            if reserve is None:
                raise LDMoleError("memory_gib needs the engine's memory reserve to size the KV cache")
            num_blocks = kv_bytes_within(self.memory_gib, reserve) // block_bytes - 1  # the runner adds a scratch block
        else:
            num_blocks = self.num_blocks or max(int(self.kv_cache_gib * 2**30) // block_bytes,
                                                -(-max_model_len // self.block_size))
        if num_blocks * self.block_size < max_model_len:
            raise LDMoleError(f"the KV cache ({num_blocks} blocks of {self.block_size}) cannot hold one sequence "
                              f"of max_model_len={max_model_len} tokens")
        eos = getattr(cfg.hf_config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        return dataclasses.replace(self, max_model_len=max_model_len, num_blocks=num_blocks,
                                   eos_token_ids=frozenset(eos), vocab_size=cfg.vocab_size)
