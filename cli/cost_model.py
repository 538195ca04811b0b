"""`ldmole bench --estimate h100|a100`: a roofline ESTIMATE of one decode step on a GPU, made on any
machine (no GPU needed). It is not a measurement.

What it counts. One decode step of a one-layer model of the real shape runs through the real engine
on the CPU, with the Triton kernels swapped for recorders (cli/kernel_launches.py), so every launch
is what the backend really issues:
* aten ops (the base model's matmuls, norms, RoPE, attention, the adapters' host-side ops): each
  is one kernel whose time is  launch + max(bytes / HBM bandwidth, multiply-adds / tensor-core
  rate, elementwise work / FP32 rate), with the whole chip. The decoder layer is counted
  num_layers times; the LM head (vocab x hidden) and the KV cache reads at the given context
  length are added from the config, since the recorded step uses a small vocabulary and context.
* the Triton kernels: their recorded grids, and per program the work of their loops: routing
  (router logits, AdaMoLE thresholds and the λ-network as fp32 dots in the kernel's precision: tf32x3,
  three tf32 MMAs per product on tensor cores, or "ieee", FMAs on CUDA cores; then the router
  epilogue), shrink and expand (tensor-core dots in 16-row rank chunks, only for experts a block
  activates). A kernel whose grid is smaller than the chip runs at the rate of the SMs it fills:
  its time is  launch + max(its bytes / min(HBM, SMs used x per-SM bandwidth), its slowest SM's
  work / per-SM rate). A weight tile that several programs of one launch read (each block of a set
  reads the set's tiles) comes from HBM once while the launch's bytes fit in L2 (`unique_bytes`).
* sparsity: each token activates `active` of E experts per projection at random, so a block of m
  tokens activates an expert with probability 1 - (1 - active/E)^m.

The GPU figures are the vendors' datasheet numbers (dense, no sparsity); launch overhead and the
bandwidth one SM can draw are assumptions, stated below. Everything printed is an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# NVIDIA datasheets: H100 SXM5 80 GB (3.35 TB/s HBM3, 132 SMs, 67 TFLOPS FP32, 494.7 TFLOPS dense TF32,
# 989 TFLOPS dense BF16); A100 SXM4 80 GB (2.039 TB/s HBM2e, 108 SMs, 19.5 TFLOPS FP32, 156 TFLOPS dense
# TF32, 312 TFLOPS dense BF16); L2: 50 MB (H100), 40 MB (A100).
# Assumptions: decode steps replay a CUDA graph (the engine does, with the triton backend), where a kernel
# costs ~1 µs to start; one SM draws at most 4x its even share of HBM bandwidth.
GPUS = {
    "h100": dict(hbm_bytes_s=3.35e12, sms=132, fp32_flops=67e12, tf32_flops=494.7e12, tc_flops=989e12,
                 l2_bytes=50e6, launch_s=1.0e-6),
    "a100": dict(hbm_bytes_s=2.039e12, sms=108, fp32_flops=19.5e12, tf32_flops=156e12, tc_flops=312e12,
                 l2_bytes=40e6, launch_s=1.0e-6),
}
SM_BANDWIDTH_SHARE = 4.0
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "linear"}
ONCE_PER_STEP = {"embedding", "cos", "sin"}  # outside the decoder layers (token embedding, RoPE tables)


@dataclass
class Kernel:
    name: str
    bytes: float = 0.0  # HBM traffic
    mma: float = 0.0  # tensor-core multiply-adds
    fma: float = 0.0  # CUDA-core multiply-adds (and elementwise work)
    programs: int = 0  # 0: a library kernel over the whole chip
    per_program: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (bytes, mma, fma) of the busiest program
    count: int = 1  # how many times per step (layers)
    mma_rate: str = "tc_flops"  # the tensor cores' rate for its operands: bf16/fp16, or tf32
    # the bytes a Triton launch touches once: its programs re-read a weight tile (each block of a set
    # reads the set's tiles), and while the launch's working set fits in L2 those re-reads hit L2
    unique_bytes: float | None = None


    def seconds(self, gpu: dict) -> float:
        sms = gpu["sms"]
        hbm = self.bytes if self.unique_bytes is None or self.unique_bytes > gpu["l2_bytes"] else self.unique_bytes
        if self.programs == 0:
            body = max(hbm / gpu["hbm_bytes_s"], 2 * self.mma / gpu[self.mma_rate],
                       2 * self.fma / gpu["fp32_flops"])
        else:
            used = min(self.programs, sms)
            waves = math.ceil(self.programs / sms)
            bandwidth = min(gpu["hbm_bytes_s"], used * SM_BANDWIDTH_SHARE * gpu["hbm_bytes_s"] / sms)
            _, mma, fma = self.per_program
            compute = waves * max(2 * mma / (gpu[self.mma_rate] / sms), 2 * fma / (gpu["fp32_flops"] / sms))
            body = max(hbm / bandwidth, compute)
        return self.count * (gpu["launch_s"] + body)


@dataclass
class StepCost:
    kernels: list[Kernel] = field(default_factory=list)

    def seconds(self, gpu) -> float:
        return sum(k.seconds(gpu) for k in self.kernels)

    def by_name(self, gpu) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.kernels:
            out[k.name] = out.get(k.name, 0.0) + k.seconds(gpu)
        return out


class _AtenRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels: list[Kernel] = []
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active and not func.is_view and func.overloadpacket.__name__ not in ("empty", "empty_strided"):
            tensors = {t.data_ptr(): t for t in _tensors((args, kwargs, out))}
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            name = func.overloadpacket.__name__
            if name == "linear":  # x [M, K], weight [N, K]
                mma = args[0].numel() // args[0].shape[-1] * args[1].shape[0] * args[1].shape[1]
                self.kernels.append(Kernel(f"aten.{name}", nbytes, mma=mma))
            elif name in MATMULS:
                a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
                mma = a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
                self.kernels.append(Kernel(f"aten.{name}", nbytes, mma=mma))
            else:
                numel = max((t.numel() for t in _tensors(out)), default=0)
                self.kernels.append(Kernel(f"aten.{name}", nbytes, fma=numel))
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _triton_kernel(launch, active: float, experts: int) -> Kernel:
    """Per-program work of one recorded Triton launch, from its arguments (see kernels/triton/)."""
    a, kw = launch.args, launch.kwargs
    blocks, set_info = a[3], a[4]
    live = [(int(s), int(e) - int(st)) for s, st, e in blocks.tolist() if s >= 0]
    if launch.name in ("_route_gemm_kernel", "_route_epilogue_kernel"):  # a set adapting none of the group exits
        live = [(s, n) for s, n in live if bool(a[5 if launch.name == "_route_gemm_kernel" else 3][s].any())]
    rank = max((int(set_info[s, 4]) for s, _ in live), default=0)  # the sets' own ranks bound the loops
    m = max((n for _, n in live), default=0)
    block_m = kw["BLOCK_M"]
    q = 1 - (1 - active / experts) ** max(m, 1)  # an expert is active in a block
    tokens: dict[int, int] = {}
    for s, n in live:
        tokens[s] = tokens.get(s, 0) + n
    # an expert is active for some token of the set: its weights are read from HBM at least once
    q_set = {s: 1 - (1 - active / experts) ** max(n, 1) for s, n in tokens.items()}
    rows = sum(n for _, n in live)
    if launch.name == "_route_gemm_kernel":
        # one program per (block, chunk of 16 outputs): λ hidden units (sparsegen), router logits, thresholds
        x, IN, NH, EP = a[0], a[12], kw["NH"], kw["EP"]
        elt = x.element_size()

        def chunks_of(s):
            kind = int(set_info[s, 2])
            return (NH if kind == 0 else 0) + (EP // 16 if kind != 2 else 0) + (1 if kind == 4 else 0)

        chunks = sum(chunks_of(s) for s, _ in live)
        products = block_m * 16 * IN  # a dot's M is the whole block, padding rows included
        per_bytes = 16 * IN * 4 + block_m * IN * elt
        unique = sum(chunks_of(s) for s in tokens) * 16 * IN * 4 + rows * IN * elt
        programs = blocks.shape[0] * (NH + EP // 16 + 1)
        if kw["PRECISION"] == "ieee":  # fp32 dots on CUDA cores
            return Kernel("triton.route", chunks * per_bytes, fma=chunks * products, programs=programs,
                          per_program=(per_bytes, 0.0, products), unique_bytes=unique)
        passes = {"tf32": 1, "tf32x3": 3}[kw["PRECISION"]]  # tf32 MMAs per product on tensor cores
        return Kernel("triton.route", chunks * per_bytes, mma=chunks * passes * products, programs=programs,
                      per_program=(per_bytes, passes * products, 0.0), mma_rate="tf32_flops", unique_bytes=unique)
    if launch.name == "_route_epilogue_kernel":  # tests and tools only: the backend runs it inside shrink
        return Kernel("triton.route_epilogue", 0.0)
    rank_rows = 16 * math.ceil(rank / 16)
    if launch.name == "_shrink_kernel":
        x, IN, P, EMAX = a[0], a[16], kw["P"], kw["EMAX"]
        elt = x.element_size()
        per_bytes = rank_rows * IN * elt + block_m * IN * elt
        mma = block_m * rank_rows * IN
        # every program of an expert the set has runs the routing epilogue first (EMAX·P passes over the tile)
        epilogue = EMAX * P * block_m * kw["EP"] * 6 if kw["ROUTE"] else 0
        programs = blocks.shape[0] * P * EMAX
        busy = len(live) * P * experts * q
        unique = sum(P * experts * q_set[s] for s in tokens) * rank_rows * IN * elt + rows * IN * elt
        return Kernel("triton.shrink", busy * per_bytes, mma=busy * mma, fma=len(live) * P * experts * epilogue,
                      programs=programs, per_program=(per_bytes, mma, epilogue), unique_bytes=unique)
    # expand: one program per (block, column tile); loops over the set's experts, active ones only
    y, widths = a[0], a[11:14]
    block_n = kw["BLOCK_N"]
    tiles = sum(math.ceil(w / block_n) for w in widths)
    elt = y.element_size()
    per_expert_bytes = rank_rows * block_n * elt
    per_bytes = experts * q * per_expert_bytes + 2 * block_m * block_n * elt
    mma = experts * q * block_m * rank_rows * block_n
    unique = sum(tiles * experts * q_set[s] for s in tokens) * per_expert_bytes + 2 * rows * sum(widths) * elt
    return Kernel("triton.expand", len(live) * tiles * per_bytes, mma=len(live) * tiles * mma,
                  programs=blocks.shape[0] * tiles, per_program=(per_bytes, mma, 0.0), unique_bytes=unique)


def record_decode_step(shape: str, dtype: str, batch: int, adapters: bool, experts: int, rank: int,
                       lambda_hidden: int, active: float, seed: int = 0) -> tuple[list[Kernel], object]:
    """The kernels of one decode step of one decoder layer (the engine's real forward, on the CPU,
    Triton kernels recorded instead of run), and the model config."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend on a CPU; its kernels only record
    from ldmole_cli.bench import SHAPES
    from ldmole_cli.kernel_launches import recording
    from ldmole_runtime.adapters.init import new_adapter_set
    from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
    from ldmole_runtime.engine.sampling_params import SamplingParams
    from ldmole_runtime.model.config import ModelConfig
    from ldmole_runtime.model.decoder import DecoderModel
    from ldmole_runtime.model.runtime import LDMoleRuntime, resolve_dtype

    hf = SHAPES[shape]()
    full = ModelConfig.from_hf(hf)
    hf.num_hidden_layers, hf.vocab_size = 1, 512
    cfg = ModelConfig.from_hf(hf)
    torch.manual_seed(seed)
    model = DecoderModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    rt = LDMoleRuntime(model.to(resolve_dtype(dtype)).eval().requires_grad_(False))
    if adapters:
        rt.load_adapter("a", new_adapter_set(cfg, num_experts=experts, rank=rank, alpha=2.0 * rank,
                                             lambda_hidden=lambda_hidden, seed=seed))
    recorder = _AtenRecorder()
    with recording() as launches:
        engine = LLMEngine(rt, config=EngineConfig(block_size=16, num_blocks=batch * 2 + 4, max_num_seqs=batch,
                                                   max_num_batched_tokens=max(64, 4 * batch), max_model_len=32,
                                                   enable_prefix_caching=False, lora_backend="triton",
                                                   decode_graphs="off", expert_sample_every=0))
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{i}", [1 + (i + j) % 500 for j in range(4)], params, "a" if adapters else None)
        engine.step()  # prefill
        inner = type(rt.model).forward

        def recorded(input_ids, positions, ctx):
            recorder.active = True
            try:
                return inner(rt.model, input_ids, positions, ctx)
            finally:
                recorder.active = False

        rt.model.forward = recorded
        del launches[:]
        with recorder:
            engine.step()  # the decode step
        step_launches = list(launches)
    kernels = recorder.kernels + [_triton_kernel(launch, active, experts) for launch in step_launches]
    for k in kernels:
        k.count = 1 if k.name.removeprefix("aten.") in ONCE_PER_STEP else full.num_layers
    return kernels, full


def estimate(shape: str, dtype: str, gpu_name: str, batch_sizes, experts: int, rank: int, lambda_hidden: int,
             active: float, context: int = 512) -> dict:
    gpu = GPUS[gpu_name]
    elt = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    out = {"estimate": f"roofline estimate for {gpu_name} (not measured): see cli/cost_model.py", "gpu": gpu_name,
           "context": context, "active_experts": active, "experts": experts, "rank": rank,
           "decode_step_ms": {}, "ratios": {}, "routing_share": {}, "dominant_adapter_kernel": {}}
    for batch in batch_sizes:
        times = {}
        for variant, adapters in (("base", False), ("ldmole_sparse", True)):
            kernels, cfg = record_decode_step(shape, dtype, batch, adapters, experts, rank, lambda_hidden, active)
            kv = batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elt
            head = cfg.vocab_size * cfg.hidden_size
            kernels += [Kernel("kv_cache_reads", kv), Kernel("lm_head", head * elt, mma=batch * head)]
            step = StepCost(kernels)
            times[variant] = step.seconds(gpu)
            if adapters:
                names = step.by_name(gpu)
                route = names.get("triton.route", 0.0)
                out["routing_share"][f"decode_b{batch}"] = round(route / times[variant], 3)
                triton = {k: v for k, v in names.items() if k.startswith("triton.")}
                out["dominant_adapter_kernel"][f"decode_b{batch}"] = max(triton, key=triton.get) if triton else None
        out["decode_step_ms"][f"b{batch}"] = {k: round(v * 1e3, 3) for k, v in times.items()}
        out["ratios"][f"decode_b{batch}"] = {"sparse_over_base": round(times["base"] / times["ldmole_sparse"], 3)}
    _, cfg = record_decode_step(shape, dtype, 1, False, experts, rank, lambda_hidden, active)
    weights = (cfg.num_layers * (cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
               + cfg.num_heads * cfg.head_dim * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
               + cfg.vocab_size * cfg.hidden_size) * elt
    out["base_b1_hbm_bound_ms"] = round(weights / gpu["hbm_bytes_s"] * 1e3, 3)
    return out
