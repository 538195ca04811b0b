"""`ldmole compile-kernels`: every Triton kernel variant the backend can launch, compiled ahead of
time for real GPUs (sm_80, sm_90) on a machine without one, with ptxas's register, spill and
shared-memory report.

Triton compiles the whole way (TTIR, TTGIR, LLIR, PTX, cubin) without a driver when it is given a
target. The variants are the distinct specialisations (argument dtypes, constexprs, alignment
attributes) of the launches the real backend makes (cli/kernel_launches.py) on one layer of each
target shape, in fp32/bf16/fp16, for banks holding every router kind, a bank without any λ-network
and a bank of wide sets, with routing capture on and off. The binder that specialises them is
Triton's own, so a variant here is exactly what a GPU would compile at its first launch.

Compiled kernels land in Triton's cache (TRITON_CACHE_DIR), so a second run only re-reads them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import torch

from ldmole_cli.kernel_launches import DTYPES, SHAPES, Launch, bank_for, model_config, step_launches

TARGETS = (80, 90)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # what a launch may set beyond its arguments
SHARED_LIMIT = 99 * 1024  # bytes of shared memory a block may use on sm_80/sm_90 (opt-in maximum: 163/227 KiB)

# bank compositions: every router kind together; λ-free sets only (no λ-network of any fan-in); wide sets
BANKS = {
    "all_routers": {
        "sparsegen": dict(num_experts=8, rank=8),
        "softmax": dict(num_experts=4, rank=8, router="softmax"),
        "topk": dict(num_experts=6, rank=8, router="topk", top_k=2),
        "threshold": dict(num_experts=5, rank=8, router="threshold"),
        "lora": dict(num_experts=1, rank=16),
    },
    "lambda_free": {
        "softmax": dict(num_experts=8, rank=8, router="softmax"),
        "threshold": dict(num_experts=8, rank=8, router="threshold"),
    },
    "wide": {
        "wide": dict(num_experts=16, rank=64, lambda_hidden=512),
        "attention_only": dict(num_experts=8, rank=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    },
}
TOKENS = 40  # a step of several blocks: every set present, bare-base tokens too


@dataclass
class Variant:
    kernel: str
    module: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    sources: list  # (shape, dtype, bank, capture) that launch it

    @property
    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, sorted(map(str, self.constexprs.items())),
                           sorted(map(str, self.attrs.items()))])


@dataclass
class Compiled:
    kernel: str
    target: str
    constexprs: str
    signature_dtypes: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    num_warps: int
    seconds: float
    sources: list


def _jit_function(module: str, name: str, binding_only: bool = False):
    fn = getattr(importlib.import_module(module), name)
    if not hasattr(fn, "fn"):  # not Triton's: a test's wrapper around the kernel
        fn = fn.kernel
    if not hasattr(fn, "params"):  # an InterpretedFunction: TRITON_INTERPRET=1 was set when it was defined
        if binding_only:  # the binder needs only the signature: a JITFunction of the same Python function
            from triton.runtime.jit import JITFunction
            return JITFunction(fn.fn)
        raise RuntimeError("compile-kernels needs real Triton JIT functions: run it without TRITON_INTERPRET=1")
    return fn


def specialise(launch: Launch, source) -> Variant:
    """Triton's own binder on the recorded arguments, for a CUDA target (no driver needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.module, launch.name, binding_only=True)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Variant(launch.name, launch.module, signature, constexprs, attrs,
                   {k: v for k, v in options.__dict__.items() if k in LAUNCH_OPTIONS},
                   [source])


def variants(shapes=tuple(SHAPES), dtypes=tuple(DTYPES), banks=tuple(BANKS)) -> list[Variant]:
    found: dict[str, Variant] = {}
    for shape in shapes:
        cfg = model_config(shape)
        for dtype in dtypes:
            for bank_name in banks:
                bank = bank_for(cfg, BANKS[bank_name], DTYPES[dtype])
                S = len(bank.slots)
                set_ids = torch.arange(TOKENS) % (S + 1) - 1
                for capture in (False, True):
                    for launch in step_launches(bank, set_ids, capture):
                        v = specialise(launch, (shape, dtype, bank_name, capture))
                        if v.key in found:
                            found[v.key].sources.append(v.sources[0])
                        else:
                            found[v.key] = v
    return list(found.values())


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, capability: int) -> tuple[int, int, int, int]:
    """(registers, spill stores, spill loads, stack bytes) from ptxas -v, with the flags Triton assembles with.
    Kept beside Triton's cache, by the PTX's hash: a warm run needs no assembler."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    cache = pathlib.Path(os.environ.get("TRITON_CACHE_DIR") or pathlib.Path.home() / ".triton" / "cache") / "ptxas-v"
    entry = cache / f"{hashlib.sha256(ptx.encode()).hexdigest()}-{capability}.json"
    if entry.is_file():
        return tuple(json.loads(entry.read_text()))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([get_ptxas(capability).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(capability)}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = max(int(m) for m in _PTXAS.findall(out))
    spills = [tuple(map(int, m)) for m in _SPILL.findall(out)] or [(0, 0, 0)]
    stack, stores, loads = (max(s[i] for s in spills) for i in range(3))
    cache.mkdir(parents=True, exist_ok=True)
    partial = entry.with_suffix(f".{os.getpid()}")
    partial.write_text(json.dumps([regs, stores, loads, stack]))
    partial.replace(entry)  # atomic: a parallel worker never reads half an entry
    return regs, stores, loads, stack


def compile_variant(job: tuple[Variant, int]) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, capability = job
    fn = _jit_function(variant.module, variant.kernel)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, variant.signature, variant.constexprs, variant.attrs),
                            target=GPUTarget("cuda", capability, 32), options=dict(variant.options))
    seconds = time.perf_counter() - start
    regs, stores, loads, stack = ptxas_report(kernel.asm["ptx"], capability)
    dtypes = ",".join(sorted({t for t in variant.signature.values() if t.startswith("*")}))
    constexprs = ",".join(f"{fn.arg_names[path[0]]}={value}" for path, value in variant.constexprs.items())
    return Compiled(variant.kernel, f"sm_{capability}", constexprs, dtypes, regs, stores, loads, stack,
                    kernel.metadata.shared, kernel.metadata.num_warps, round(seconds, 2),
                    [list(s) for s in variant.sources])


def compile_all(found: list[Variant], targets=TARGETS, workers: int | None = None) -> list[Compiled]:
    jobs = [(v, cc) for v in found for cc in targets]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [compile_variant(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        return list(pool.map(compile_variant, jobs))


def report(results: list[Compiled]) -> dict:
    def worst(key):
        top = max(results, key=lambda r: getattr(r, key))
        return {"value": getattr(top, key), "kernel": top.kernel, "target": top.target, "constexprs": top.constexprs}

    problems = [f"{r.kernel} {r.target} [{r.constexprs}] ({r.signature_dtypes}): {r.spill_stores} B spill stores, "
                f"{r.spill_loads} B spill loads, {r.shared_bytes} B shared"
                for r in results if r.spill_stores or r.spill_loads or r.shared_bytes > SHARED_LIMIT]
    return {"variants": len({(r.kernel, r.constexprs, r.signature_dtypes) for r in results}),
            "compiled": len(results), "targets": sorted({r.target for r in results}),
            "worst_registers": worst("registers"), "worst_shared_bytes": worst("shared_bytes"),
            "max_spill_bytes": max(max(r.spill_stores, r.spill_loads) for r in results),
            "compile_seconds": round(sum(r.seconds for r in results), 1),
            "problems": problems, "results": [asdict(r) for r in results]}


def run(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("ldmole compile-kernels: unset TRITON_INTERPRET (it compiles for real GPUs, not for the "
                         "interpreter)")
    found = variants(args.shapes.split(","), args.dtypes.split(","), tuple(BANKS))
    results = compile_all(found, tuple(int(t) for t in args.targets.split(",")), args.workers)
    out = report(results)
    if args.json:
        print(json.dumps(out))
    else:
        for r in sorted(results, key=lambda r: (r.kernel, r.target, r.constexprs)):
            print(f"{r.kernel:15s} {r.target} regs {r.registers:3d} spills {r.spill_stores:4d}/{r.spill_loads:4d} B "
                  f"shared {r.shared_bytes:6d} B  {r.signature_dtypes}  {r.constexprs}")
        print(f"{out['variants']} variants, {out['compiled']} compiled; worst registers {out['worst_registers']}, "
              f"worst shared {out['worst_shared_bytes']}; {len(out['problems'])} problem(s)")
    return 1 if out["problems"] else 0


def add_parser(sub) -> None:
    c = sub.add_parser("compile-kernels", help="compile every Triton kernel variant the backend launches for real "
                       "GPUs (no GPU needed) and report registers, spills and shared memory; exit 1 on a spill "
                       "or on shared memory over 99 KiB")
    c.add_argument("--shapes", default=",".join(SHAPES), help=f"model shapes, comma-separated (default: all of "
                   f"{', '.join(SHAPES)})")
    c.add_argument("--dtypes", default=",".join(DTYPES), help="dtypes, comma-separated (default: float32,bfloat16,"
                   "float16)")
    c.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    c.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU core)")
    c.add_argument("--json", action="store_true", help="print one JSON object with every variant's report")
    c.set_defaults(func=run)
