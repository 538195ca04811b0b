"""The Triton launches the backend really issues, recorded instead of run.

The three kernels of kernels/triton/ are swapped for recorders while the real TritonBackend applies
a bank to one step: what comes back is each launch's kernel, grid and arguments, exactly as the
backend built them. `ldmole compile-kernels` compiles every distinct variant among them for real
GPUs, and the cost model reads their grids and shapes.

The banks are one layer of the model shapes the project targets, with random weights: the
launches depend on shapes, dtypes and the mix of routers, not on values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

KERNELS = (("ldmole_kernels.triton.routing", "_route_gemm_kernel"),
           ("ldmole_kernels.triton.routing", "_route_epilogue_kernel"),
           ("ldmole_kernels.triton.shrink_expand", "_shrink_kernel"),
           ("ldmole_kernels.triton.shrink_expand", "_expand_kernel"))

# one decoder layer of each target shape (transformers config fields)
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128),
}
GROUPS = ("qkv", "o", "gate_up", "down")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Launch:
    module: str  # where the kernel lives, and its name there: how a worker process finds it again
    name: str
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, module, name, into: list):
        self.module, self.name, self.into = module, name, into

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.into.append(Launch(self.module.__name__, self.name, tuple(grid), args, kwargs))
        return record


@contextlib.contextmanager
def recording():
    """Inside the block, the Triton kernels record their launches into the yielded list instead of running."""
    import importlib

    launches: list[Launch] = []
    modules = [(importlib.import_module(module), name) for module, name in KERNELS]
    saved = [(module, name, getattr(module, name)) for module, name in modules]
    for module, name, _ in saved:
        setattr(module, name, _Recorder(module, name, launches))
    try:
        yield launches
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def model_config(shape: str):
    from transformers import AutoConfig

    from ldmole_runtime.model.config import ModelConfig

    fields = dict(SHAPES[shape])
    hf = AutoConfig.for_model(fields.pop("model_type"), num_hidden_layers=1, vocab_size=256,
                              max_position_embeddings=4096, rms_norm_eps=1e-6, **fields)
    return ModelConfig.from_hf(hf)


def bank_for(cfg, sets: dict, dtype: torch.dtype):
    """An AdapterBank of `sets` (name -> new_adapter_set keyword arguments) on one layer of cfg."""
    from ldmole_runtime.adapters.init import new_adapter_set
    from ldmole_runtime.lora.bank import AdapterBank

    bank = AdapterBank(cfg, dtype=dtype)
    for i, (name, kwargs) in enumerate(sets.items()):
        bank.add(name, new_adapter_set(cfg, seed=i, **kwargs))
    return bank


def step_launches(bank, set_ids: torch.Tensor, capture: bool, groups=GROUPS) -> list[Launch]:
    """The launches of one step of tokens (set_ids: each token's set, -1 bare base) over `groups`."""
    from ldmole_runtime.lora.adapter_batch import AdapterBatch
    from ldmole_runtime.lora.capture import RoutingCapture
    from ldmole_runtime.lora.ops.triton import TritonBackend

    batch = AdapterBatch.build(set_ids, bank.capacity)
    n = set_ids.shape[0]
    with recording() as launches, torch.no_grad():
        for group in groups:
            gb = bank.group(0, group)
            x = torch.zeros(n, gb.fan_in, dtype=bank.dtype)
            y = torch.zeros(n, sum(gb.fan_outs), dtype=bank.dtype)
            sink = RoutingCapture(n, max(s.num_experts for s in bank.slots)) if capture else None
            TritonBackend().apply(y, x, bank, gb, batch, sink)
    return launches
