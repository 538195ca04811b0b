"""`ldmole bench`: decode and prefill throughput of the engine, in one process, on one model shape.

Three variants run on the same engine settings and the same weights, so their ratios are
meaningful on a noisy machine: (a) the bare base, (b) LD-MoLE on the sparse expert path, (c) the
dense all-experts reference. The adapter follows the paper: E = 8, r = 8, all seven projections,
λ-network hidden 256.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, Qwen3Config

from .adapters.init import new_adapter_set
from .config import ModelConfig
from .engine.llm_engine import EngineConfig, LLMEngine
from .engine.sampling_params import SamplingParams
from .model import DecoderModel
from .runtime import LDMoleRuntime, resolve_dtype

SHAPES = {
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_theta=100000.0),
    "qwen3-0.6b": lambda: Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_theta=1000000.0),
    "tiny": lambda: Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False),
}


@dataclass
class BenchSettings:
    shape: str = "smollm2-135m"
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 32
    decode_steps: int = 16
    prefill_prompts: int = 4
    prefill_len: int = 256
    experts: int = 8
    rank: int = 8
    lambda_hidden: int = 256
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0


def random_model(shape: str, dtype: torch.dtype, device: str, seed: int) -> DecoderModel:
    """A base model of the named shape with random weights (throughput does not depend on them)."""
    cfg = ModelConfig.from_hf(SHAPES[shape]())
    torch.manual_seed(seed)
    model = DecoderModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _engine(rt: LDMoleRuntime, mode: str, max_seqs: int, s: BenchSettings) -> LLMEngine:
    max_len = max(s.prompt_len + s.decode_steps + 8, s.prefill_len + 8)
    blocks = max_seqs * -(-max_len // 16) + 8
    return LLMEngine(rt, config=EngineConfig(block_size=16, num_blocks=blocks, max_num_seqs=max_seqs,
                                             max_num_batched_tokens=max(2048, s.prefill_len), max_model_len=max_len,
                                             enable_prefix_caching=False, mode=mode))


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def decode_tokens_per_s(rt: LDMoleRuntime, variants: dict[str, tuple[str | None, str]], batch: int,
                        s: BenchSettings) -> dict[str, float]:
    """Decode throughput of every variant, their steps interleaved round-robin so that machine noise
    hits all of them alike; each variant's median step time gives its tokens/s."""
    engines = {}
    for name, (adapter, mode) in variants.items():
        engine = _engine(rt, mode, batch, s)
        params = SamplingParams(max_tokens=s.decode_steps + 2, temperature=0, ignore_eos=True)
        for i, prompt in enumerate(_prompts(batch, s.prompt_len, rt.cfg.vocab_size, s.seed)):
            engine.add_request(f"d{i}", prompt, params, adapter)
        while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running) \
                or engine.scheduler.waiting:
            engine.step()  # prefill (and the first sampled token) is not part of decode throughput
        engine.step()  # warm-up decode step
        engines[name] = engine
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(s.decode_steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def prefill_tokens_per_s(rt: LDMoleRuntime, adapter: str | None, mode: str, s: BenchSettings) -> float:
    engine = _engine(rt, mode, s.prefill_prompts, s)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request("warm", _prompts(1, 16, rt.cfg.vocab_size, s.seed + 1)[0], params, adapter)
    while engine.has_unfinished_requests():
        engine.step()
    for i, prompt in enumerate(_prompts(s.prefill_prompts, s.prefill_len, rt.cfg.vocab_size, s.seed + 2)):
        engine.add_request(f"p{i}", prompt, params, adapter)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return s.prefill_prompts * s.prefill_len / (time.perf_counter() - start)


def mean_active_experts(rt: LDMoleRuntime, adapter: str, s: BenchSettings) -> float:
    ids = torch.tensor(_prompts(2, 64, rt.cfg.vocab_size, s.seed + 3))
    out = rt.forward(ids, adapter, capture_routing=True)
    return torch.stack([(p > 0).sum(-1).float().mean() for p in out.routing.values()]).mean().item()


def run(s: BenchSettings) -> dict:
    torch.manual_seed(s.seed)
    model = random_model(s.shape, resolve_dtype(s.dtype), s.device, s.seed)
    rt = LDMoleRuntime(model)
    rt.load_adapter("bench", new_adapter_set(rt.cfg, num_experts=s.experts, rank=s.rank, alpha=2.0 * s.rank,
                                             lambda_hidden=s.lambda_hidden, seed=s.seed, b_std=0.02))
    variants = {"base": (None, "sparse"), "ldmole_sparse": ("bench", "sparse"), "ldmole_dense": ("bench", "dense")}
    warm = BenchSettings(**{**s.__dict__, "decode_steps": 2, "prefill_prompts": 1, "prefill_len": 32})
    decode_tokens_per_s(rt, variants, max(s.batch_sizes), warm)  # first calls pay for allocator growth, kernel builds
    result: dict = {
        "shape": s.shape, "device": s.device, "dtype": s.dtype, "threads": torch.get_num_threads(),
        "adapter": {"experts": s.experts, "rank": s.rank, "lambda_hidden": s.lambda_hidden,
                    "target_modules": "all seven", "router": "sparsegen"},
        "prompt_len": s.prompt_len, "decode_steps": s.decode_steps,
        "decode_tokens_per_s": {}, "prefill_tokens_per_s": {},
    }
    for name in variants:
        result["decode_tokens_per_s"][name] = {}
    for b in s.batch_sizes:
        for name, tps in decode_tokens_per_s(rt, variants, b, s).items():
            result["decode_tokens_per_s"][name][str(b)] = round(tps, 2)
    for name, (adapter, mode) in variants.items():
        result["prefill_tokens_per_s"][name] = round(prefill_tokens_per_s(rt, adapter, mode, s), 2)
    dec = result["decode_tokens_per_s"]
    result["ratios"] = {
        f"decode_b{b}": {"sparse_over_base": round(dec["ldmole_sparse"][str(b)] / dec["base"][str(b)], 3),
                         "sparse_over_dense": round(dec["ldmole_sparse"][str(b)] / dec["ldmole_dense"][str(b)], 3)}
        for b in s.batch_sizes}
    pre = result["prefill_tokens_per_s"]
    result["ratios"]["prefill"] = {"sparse_over_base": round(pre["ldmole_sparse"] / pre["base"], 3),
                                   "sparse_over_dense": round(pre["ldmole_sparse"] / pre["ldmole_dense"], 3)}
    result["mean_active_experts_per_token"] = round(mean_active_experts(rt, "bench", s), 3)
    return result
