"""Every Triton kernel variant the backend launches compiles for real GPUs (sm_80 and sm_90), with no
register spills and at most 99 KiB of shared memory: `ldmole compile-kernels`, which records the
backend's launches on one layer of SmolLM2-135M, Qwen3-1.7B and Llama-3.2-3B in fp32/bf16/fp16
(every router kind, a bank without λ-networks, wide sets; capture on and off), specialises them
with Triton's own binder and compiles each through ptxas. No GPU is needed, and the interpreter
that the other kernel tests use is not involved: the process runs without TRITON_INTERPRET.

Compiled kernels are kept in a Triton cache under the ldmole cache folder, so later runs on the
same machine only re-read them."""

import json
import os
import subprocess
import sys

from ldmole_runtime.paths import default_cache_dir


def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(default_cache_dir() / "triton-aot"))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, said out loud (silences its warning)
    out = subprocess.run([sys.executable, "-m", "ldmole_cli.main", "compile-kernels", "--json"],
                         capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["problems"] == [], "\n".join(report["problems"])
    assert out.returncode == 0
    results = report["results"]
    # every kernel, on both targets, in every dtype
    seen = {(r["kernel"], r["target"], dtype) for r in results for dtype in r["signature_dtypes"].split(",")}
    for kernel in ("_route_gemm_kernel", "_shrink_kernel", "_expand_kernel"):
        for target in ("sm_80", "sm_90"):
            for dtype in ("*fp32", "*bf16", "*fp16"):
                assert (kernel, target, dtype) in seen, (kernel, target, dtype)
    # both routing variants (with and without a λ-network of the group's fan-in), capture on and off
    route = [r["constexprs"] for r in results if r["kernel"] == "_route_gemm_kernel"]
    shrink = [r["constexprs"] for r in results if r["kernel"] == "_shrink_kernel"]
    for flag in ("HAS_LAMBDA=True", "HAS_LAMBDA=False"):
        assert any(flag in c for c in route), flag
    for flag in ("STORE_SCALAR=True", "STORE_SCALAR=False", "ROUTE=True"):
        assert any(flag in c for c in shrink), flag
    assert report["variants"] >= 60 and report["compiled"] >= 2 * report["variants"]
    assert report["max_spill_bytes"] == 0
    assert report["worst_shared_bytes"]["value"] <= 99 * 1024
    sources = {tuple(s[:3]) for r in results for s in r["sources"]}
    assert {s[0] for s in sources} == {"smollm2-135m", "qwen3-1.7b", "llama-3.2-3b"}
    assert {s[2] for s in sources} == {"all_routers", "lambda_free", "wide"}
