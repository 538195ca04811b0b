"""`ldmole bench`: decode and prefill throughput of the engine, in one process, on one model shape.

Three variants run on the same engine settings and the same weights, so their ratios are
meaningful on a noisy machine: (a) the bare base, (b) LD-MoLE on the sparse expert path, (c) the
dense all-experts reference. The adapter follows the paper: E = 8, r = 8, all seven projections,
λ-network hidden 256.

Routing decides what the sparse path saves, so it can be made realistic two ways: a real adapter
on its real base (`adapter`, prompts cut from real benchmark text), or a random adapter whose
λ-network bias is calibrated to a stated mean of active experts (`target_experts`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, Qwen3Config

from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.model.decoder import DecoderModel
from ldmole_runtime.model.runtime import LDMoleRuntime, resolve_dtype

SHAPES = {
    "smollm2-135m": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_theta=100000.0),
    "qwen3-0.6b": lambda: Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_theta=1000000.0),
    "qwen3-1.7b": lambda: Qwen3Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
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
    base: str | None = None  # a real base model folder (or "default") instead of a random-weights shape
    adapter: str | None = None  # a real adapter folder (or "default") for that base
    target_experts: float | None = None  # calibrate a random adapter's routing to this mean
    text: str = "social_iqa"  # built-in dataset whose validation text makes the prompts of a real base
    lora_backend: str = "sparse"  # the LD-MoLE variant's backend (the dense variant is always the torch reference)
    decode_graphs: str = "auto"  # CUDA graphs for decode steps (GPU + triton backend)
    prompts: PromptSource | None = field(default=None, repr=False)  # set up by run()


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


def _engine(rt: LDMoleRuntime, lora_backend: str, max_seqs: int, s: BenchSettings) -> LLMEngine:
    max_len = max(s.prompt_len + s.decode_steps + 8, s.prefill_len + 8)
    blocks = max_seqs * -(-max_len // 16) + 8
    return LLMEngine(rt, config=EngineConfig(block_size=16, num_blocks=blocks, max_num_seqs=max_seqs,
                                             max_num_batched_tokens=max(2048, s.prefill_len), max_model_len=max_len,
                                             enable_prefix_caching=False, lora_backend=lora_backend,
                                             decode_graphs=s.decode_graphs))


class PromptSource:
    """Bench prompts: random token ids for a random-weights model; windows of real benchmark text
    for a real base, so that a real adapter routes as it does in use."""

    def __init__(self, vocab: int, tokens: list[int] | None = None):
        self.vocab, self.tokens = vocab, tokens

    @classmethod
    def from_text(cls, base, dataset: str, vocab: int) -> PromptSource:
        from ldmole_runtime.data.datasets import load_dataset
        from ldmole_runtime.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(base, needed_for="prompts cut from real text")
        texts = [getattr(e, "cloze_context", None) or getattr(e, "prompt", "") for e in
                 load_dataset(dataset, None, "validation", 400)]
        return cls(vocab, tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"])

    def __call__(self, n: int, length: int, seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        if self.tokens is None:
            return torch.randint(3, self.vocab, (n, length), generator=g).tolist()
        starts = torch.randint(0, len(self.tokens) - length, (n,), generator=g).tolist()
        return [self.tokens[i:i + length] for i in starts]


def decode_tokens_per_s(rt: LDMoleRuntime, variants: dict[str, tuple[str | None, str]], batch: int,
                        s: BenchSettings) -> dict[str, float]:
    """Decode throughput of every variant, their steps interleaved round-robin so that machine noise
    hits all of them alike; each variant's median step time gives its tokens/s."""
    engines = {}
    for name, (adapter, mode) in variants.items():
        engine = _engine(rt, mode, batch, s)
        params = SamplingParams(max_tokens=s.decode_steps + 2, temperature=0, ignore_eos=True)
        for i, prompt in enumerate(s.prompts(batch, s.prompt_len, s.seed)):
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


def prefill_tokens_per_s(rt: LDMoleRuntime, adapter: str | None, lora_backend: str, s: BenchSettings) -> float:
    engine = _engine(rt, lora_backend, s.prefill_prompts, s)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request("warm", s.prompts(1, 16, s.seed + 1)[0], params, adapter)
    while engine.has_unfinished_requests():
        engine.step()
    for i, prompt in enumerate(s.prompts(s.prefill_prompts, s.prefill_len, s.seed + 2)):
        engine.add_request(f"p{i}", prompt, params, adapter)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return s.prefill_prompts * s.prefill_len / (time.perf_counter() - start)


def mean_active_experts(rt: LDMoleRuntime, adapter: str, s: BenchSettings) -> float:
    """Mean p > 0 per token over the adapted projections, on 4 x 64 bench tokens."""
    ids = torch.tensor(s.prompts(4, 64, s.seed + 3))
    out = rt.forward(ids, adapter, capture_routing=True)
    return torch.stack([(p > 0).sum(-1).float().mean() for p in out.routing.values()]).mean().item()


def random_adapter(rt: LDMoleRuntime, s: BenchSettings, lambda_bias: float = 0.0):
    return new_adapter_set(rt.cfg, num_experts=s.experts, rank=s.rank, alpha=2.0 * s.rank,
                           lambda_hidden=s.lambda_hidden, seed=s.seed, b_std=0.02, lambda_bias=lambda_bias)


def calibrated_adapter(rt: LDMoleRuntime, s: BenchSettings, target: float):
    """A random adapter whose λ-network output bias is bisected until its mean active experts on the
    bench prompts is within 0.1 of `target` (a higher bias raises λ: fewer experts)."""
    if not 1.0 <= target <= s.experts:
        raise LDMoleError(f"--target-experts must be in [1, {s.experts}], got {target}")
    lo, hi = -30.0, 30.0
    for _ in range(40):
        mid = (lo + hi) / 2
        rt.load_adapter("calibrating", random_adapter(rt, s, mid))
        got = mean_active_experts(rt, "calibrating", s)
        rt.unload_adapter("calibrating")
        if abs(got - target) <= 0.1:
            break
        lo, hi = (mid, hi) if got > target else (lo, mid)
    else:
        raise LDMoleError(f"could not calibrate routing to {target} active experts (reached {got:.2f})")
    return random_adapter(rt, s, mid)


def _setup(s: BenchSettings) -> tuple[LDMoleRuntime, str, str]:
    """The runtime with the bench adapter loaded as "bench", the base's name, and the adapter's source."""
    if s.base is not None or s.adapter is not None:
        from ldmole_runtime.adapters.adapter_set import AdapterSet
        from ldmole_runtime.adapters.default import resolve_adapter
        from ldmole_runtime.model.default_base import resolve_base

        base = resolve_base(s.base or "default")
        rt = LDMoleRuntime.from_pretrained(base, dtype=s.dtype, device=s.device)
        s.prompts = PromptSource.from_text(base, s.text, rt.cfg.vocab_size)
        if s.adapter is not None:
            rt.load_adapter("bench", AdapterSet.load(resolve_adapter(s.adapter)))
            return rt, base.name, str(resolve_adapter(s.adapter))
        name = base.name
    else:
        rt = LDMoleRuntime(random_model(s.shape, resolve_dtype(s.dtype), s.device, s.seed))
        s.prompts = PromptSource(rt.cfg.vocab_size)
        name = s.shape
    if s.target_experts is not None:
        rt.load_adapter("bench", calibrated_adapter(rt, s, s.target_experts))
    else:
        rt.load_adapter("bench", random_adapter(rt, s))
    return rt, name, "random"


def run(s: BenchSettings) -> dict:
    torch.manual_seed(s.seed)
    rt, shape, adapter_source = _setup(s)
    c = rt.bank.slot("bench").config
    variants = {"base": (None, s.lora_backend), "ldmole_sparse": ("bench", s.lora_backend),
                "ldmole_dense": ("bench", "dense")}
    warm = BenchSettings(**{**s.__dict__, "decode_steps": 2, "prefill_prompts": 1, "prefill_len": 32})
    decode_tokens_per_s(rt, variants, max(s.batch_sizes), warm)  # first calls pay for allocator growth, kernel builds
    result: dict = {
        "shape": shape,
        "device": s.device if s.device == "cpu" else torch.cuda.get_device_name(s.device), "dtype": s.dtype,
        "threads": torch.get_num_threads(), "lora_backend": rt_backend(rt, s), "decode_graphs": s.decode_graphs,
        "adapter": {"source": adapter_source, "experts": c.num_experts, "rank": c.rank,
                    "lambda_hidden": c.lambda_hidden, "target_modules": c.target_modules, "router": c.router,
                    "target_experts": s.target_experts},
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
    if 1 in s.batch_sizes:
        # batch-1 decode reads every base weight once per token, plus the sequence's keys and values
        nbytes = decode_bytes_per_step(rt, s.prompt_len + s.decode_steps // 2)
        result["decode_b1_bytes_per_step"] = nbytes
        result["decode_b1_gb_per_s"] = {name: float(f"{nbytes * dec[name]['1'] / 1e9:.3g}") for name in variants}
    return result


def rt_backend(rt: LDMoleRuntime, s: BenchSettings) -> str:
    from ldmole_runtime.lora.ops import select_lora_backend
    return select_lora_backend(s.lora_backend, rt.device).name


def decode_bytes_per_step(rt: LDMoleRuntime, context: int) -> int:
    """Bytes a batch-1 decode step must read: the base's weights (the embedding table counts once, as
    the LM head when tied; otherwise only the LM head is read in full) and the KV of `context` tokens.
    The adapters' own bytes are left out, so LD-MoLE's figure is a lower bound of its traffic."""
    model, cfg = rt.model, rt.cfg
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("embed"))
    if model.lm_head is None:
        weights += model.embed.weight.numel() * model.embed.weight.element_size()
    kv = 2 * cfg.num_layers * context * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=rt.dtype).element_size()
    return weights + kv
