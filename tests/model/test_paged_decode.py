"""Decode attention read straight from the paged KV cache by the C kernel (kernels/cpu/paged_decode.c),
against torch's scaled_dot_product_attention over the gathered, padded batch (the path it replaces,
and the one every other device takes)."""

import pytest
import torch
from tiny_models import tiny_config, write_tiny_model

from ldmole_runtime import LDMoleRuntime
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.model import attention as attention_module
from ldmole_runtime.model.attention import PagedAttention

BLOCK, H, H_KV, D, LAYERS, BLOCKS = 4, 6, 2, 16, 2, 24


def step(dtype, seed=0):
    """A step of three decodes (contexts 1, 7 and 13: within one block, across blocks) around a prompt
    chunk of 5, over scattered blocks of a cache filled with earlier keys and values."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(LAYERS, 2, BLOCKS, BLOCK, H_KV, D, generator=g).to(dtype)
    q_lens, ctx_lens = [1, 5, 1, 1], [1, 5, 7, 13]
    order = torch.randperm(BLOCKS, generator=g).tolist()
    tables, used = [], 0
    for n in ctx_lens:
        need = -(-n // BLOCK)
        tables.append(order[used:used + need])
        used += need
    slots = torch.tensor([tables[i][(c - 1) // BLOCK] * BLOCK + (c - 1) % BLOCK if q == 1 else 0
                          for i, (q, c) in enumerate(zip(q_lens, ctx_lens, strict=True))])
    chunk = torch.tensor([tables[1][p // BLOCK] * BLOCK + p % BLOCK for p in range(5)])
    slots = torch.cat([slots[:1], chunk, slots[2:]])
    n = sum(q_lens)
    q, k, v = (torch.randn(n, heads, D, generator=g).to(dtype) for heads in (H, H_KV, H_KV))
    return cache, q_lens, ctx_lens, tables, slots, q, k, v


def attend(cache, q_lens, ctx_lens, tables, slots, q, k, v, layer=1):
    attn = PagedAttention.build(cache.clone(), q_lens, ctx_lens, tables, slots)
    with torch.inference_mode():
        return attn.attend(layer, q, k, v), attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_sdpa_over_the_gathered_cache(dtype, monkeypatch):
    args = step(dtype)
    out_kernel, attn = attend(*args)
    with torch.inference_mode():
        assert attn._decode_kernel(args[5]) is not None  # the kernel ran, not the fallback
    monkeypatch.setattr(PagedAttention, "_decode_kernel", lambda self, q: None)
    out_sdpa, _ = attend(*args)
    decode_rows = [0, 6, 7]  # the prompt chunk's rows (1..5) take the same SDPA path either way
    assert torch.equal(out_kernel[1:6], out_sdpa[1:6])
    if dtype == torch.float32:
        assert (out_kernel[decode_rows] - out_sdpa[decode_rows]).abs().max() <= 1e-5
    else:  # fp32 sums, one rounding: within a bf16 step of SDPA on the same bf16 values, in fp32
        fp32_args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        expected, _ = attend(*fp32_args)
        error = (out_kernel[decode_rows].float() - expected[decode_rows]).abs()
        assert (error <= expected[decode_rows].abs() * 2**-8 + 1e-6).all(), error.max()


def test_the_engine_decodes_through_the_kernel_with_unchanged_outputs(tmp_path, monkeypatch):
    """Greedy outputs of the engine are those of the SDPA path, and its decode steps call the kernel."""
    path = write_tiny_model(tmp_path / "llama", tiny_config("llama", kv_heads=2))
    runtime = LDMoleRuntime.from_pretrained(path)
    prompts = [[5, 9, 11, 3, 7, 2], [4, 4, 8, 1, 6, 6, 2, 9, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 3]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    calls = []
    lib = attention_module._cpu_library()

    class Counting:
        def ldmole_paged_decode(self, *args):
            calls.append(args[1])
            return lib.ldmole_paged_decode(*args)

    monkeypatch.setattr(attention_module, "_cpu_library", lambda: Counting())
    with_kernel = [o.outputs[0].token_ids for o in LLM(runtime, enable_prefix_caching=False).generate(prompts, params)]
    assert calls and max(calls) == 3
    monkeypatch.setattr(PagedAttention, "_decode_kernel", lambda self, q: None)
    with_sdpa = [o.outputs[0].token_ids for o in LLM(runtime, enable_prefix_caching=False).generate(prompts, params)]
    assert with_kernel == with_sdpa
