"""`ldmole gpu-check` (`make gpu-check`): the one script to run first when a GPU is lent. It writes
one JSON file; paste it into the issue note.

Steps, each bounded in time so the whole fits in ~8 minutes on one H100:
1. parity: the reference-code fixtures (LD-MoLE qwen3-lm, AdaMoLE llama-lm) through the triton
   backend against the torch reference, fp32 and bf16: max |logits difference| and whether the
   same experts are active;
2. graphs: greedy generation with CUDA-graph decode against eager, on mixed adapter sets, then
   again after an adapter load and after an unload between captures (multi-LoRA with CUDA graphs
   garbled output in SGLang, #29157);
3. memcheck: the Triton kernel tests under compute-sanitizer, when the toolkit is installed;
4. bench: `ldmole bench --device cuda` for SmolLM2-135M, Qwen3-0.6B and Qwen3-1.7B at 2, 4 and 8
   active experts of 8, each beside the cost model's H100 estimate (`--estimate h100`).

`--dry-run` (any machine): prints the plan and runs what needs no GPU: parity on the CPU (the
triton backend in Triton's interpreter), graphs in the "eager" static-buffer mode, and the
estimates; the steps that need CUDA are listed as skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
PARITY_CASES = {"ldmole-qwen3-lm": FIXTURES / "official-ldmole" / "qwen3-lm",
                "adamole-llama-lm": FIXTURES / "official-adamole" / "llama-lm"}
BENCH_SHAPES = ("smollm2-135m", "qwen3-0.6b", "qwen3-1.7b")
ACTIVE_EXPERTS = (2, 4, 8)
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # |logits| difference, triton vs torch


def plan(cuda: bool) -> list[str]:
    return [
        f"parity: {', '.join(PARITY_CASES)} x {', '.join(parity_dtypes(cuda))}: triton vs torch on "
        f"{'cuda' if cuda else 'cpu (dry run: float32 only)'}",
        "graphs: greedy tokens with CUDA-graph decode vs eager, before and after a load and an unload"
        + ("" if cuda else " (dry run: the static-buffer step without capture)"),
        "memcheck: compute-sanitizer on tests/kernels/test_triton_kernels.py" + ("" if cuda else " (skipped)"),
        f"bench: {', '.join(BENCH_SHAPES)} x {ACTIVE_EXPERTS} active of 8, bf16"
        + (", measured beside the H100 estimate" if cuda else f" (dry run: the H100 estimate of {BENCH_SHAPES[-1]} "
                                                             f"at {ACTIVE_EXPERTS[0]} active only)"),
    ]


def parity_dtypes(cuda: bool) -> list[str]:
    # the interpreter upcasts bf16 dots to fp32 (nothing of the GPU's bf16 path to see), and takes seconds a forward
    return list(TOLERANCE) if cuda else ["float32"]


def parity(device: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from ldmole_runtime.adapters.adapter_set import AdapterSet
    from ldmole_runtime.model.runtime import LDMoleRuntime

    out = {}
    for name, root in PARITY_CASES.items():
        ids = load_file(str(root / "expected.safetensors"))["input_ids"]
        for dtype in parity_dtypes(device == "cuda"):
            rt = LDMoleRuntime.from_pretrained(root / "base", dtype=dtype, device=device)
            rt.load_adapter("a", AdapterSet.load(root / "adapter"))
            got = rt.forward(ids, "a", lora_backend="triton", capture_routing=True)
            ref = rt.forward(ids, "a", lora_backend="torch", capture_routing=True)
            diff = (got.logits.float() - ref.logits.float()).abs().max().item()
            same = all(torch.equal(got.routing[k] > 0, ref.routing[k] > 0) for k in ref.routing)
            out[f"{name}/{dtype}"] = {"max_abs_logits_diff": diff, "same_active_experts": same,
                                      "ok": diff <= TOLERANCE[dtype]}
    return out


def graphs(device: str) -> dict:
    import torch

    from ldmole_cli.bench import random_model
    from ldmole_runtime.adapters.init import new_adapter_set
    from ldmole_runtime.engine.llm import LLM
    from ldmole_runtime.engine.sampling_params import SamplingParams
    from ldmole_runtime.model.runtime import LDMoleRuntime

    mode = "auto" if device == "cuda" else "eager"
    rt = LDMoleRuntime(random_model("tiny", torch.float32, device, 0))
    gpu = device == "cuda"  # a dry run keeps the interpreter's work small: fewer experts, prompts and tokens
    rt.load_adapter("a", new_adapter_set(rt.cfg, num_experts=8 if gpu else 3, rank=8, lambda_hidden=32, seed=1,
                                         b_std=0.05))
    rt.load_adapter("b", new_adapter_set(rt.cfg, num_experts=4 if gpu else 2, rank=4, router="softmax", seed=2,
                                         b_std=0.05))
    replayed = LLM(rt, lora_backend="triton", decode_graphs=mode, enable_prefix_caching=False)
    eager = LLM(rt, lora_backend="triton", decode_graphs="off", enable_prefix_caching=False)
    prompts = [[5, 9, 11, 3, 7], [4, 4, 8, 1], [10, 3, 3, 9, 12, 6], [7, 7, 2]][:4 if gpu else 2]
    params = SamplingParams(max_tokens=12 if gpu else 2, temperature=0, ignore_eos=True)
    sets = {"first": ["a", "b", None, "a"], "after_load": ["c", "a", "b", "c"], "after_unload": ["b", None, "a", "a"]}
    sets = {k: v[:len(prompts)] for k, v in sets.items()}
    out = {"mode": mode}

    def compare(stage, adapters):
        a = [o.outputs[0].token_ids for o in replayed.generate(prompts, params, adapter=adapters)]
        b = [o.outputs[0].token_ids for o in eager.generate(prompts, params, adapter=adapters)]
        out[stage] = {"equal": a == b, "tokens": sum(map(len, a))}

    compare("first", sets["first"])
    new = new_adapter_set(rt.cfg, num_experts=12 if gpu else 4, rank=16, lambda_hidden=32, seed=3, b_std=0.05)
    replayed.engine.load_adapter("c", new)
    compare("after_load", sets["after_load"])
    replayed.engine.unload_adapter("c")
    compare("after_unload", sets["after_unload"])
    out["ok"] = all(v["equal"] for k, v in out.items() if isinstance(v, dict))
    return out


def memcheck() -> dict:
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        return {"skipped": "compute-sanitizer is not installed"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-m", "pytest",
                          "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "kernels" / "test_triton_kernels.py")],
                         capture_output=True, text=True, env=env, timeout=240, cwd=REPO)
    return {"returncode": run.returncode, "ok": run.returncode == 0, "tail": run.stdout[-2000:] + run.stderr[-2000:]}


def bench(cuda: bool) -> dict:
    from ldmole_cli.cost_model import estimate

    out = {}
    # a dry run checks the path once: one shape, one sparsity
    for shape in BENCH_SHAPES if cuda else BENCH_SHAPES[-1:]:
        for active in ACTIVE_EXPERTS if cuda else ACTIVE_EXPERTS[:1]:
            row = {"estimate_h100": estimate(shape, "bfloat16", "h100", (1, 8, 32, 128), 8, 8, 256, active)["ratios"]}
            if cuda:
                cmd = [sys.executable, "-m", "ldmole_cli.main", "bench", "--json", "--device", "cuda", "--shape",
                       shape, "--dtype", "bfloat16", "--target-experts", str(active), "--quick"]
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
                row["measured"] = json.loads(run.stdout.strip().splitlines()[-1])["ratios"] if run.returncode == 0 \
                    else {"error": run.stderr[-1500:]}
            out[f"{shape}/active{active}"] = row
    return out


def run(args) -> int:
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported: the interpreter
    device = "cuda" if cuda else "cpu"
    steps = plan(cuda)
    print("ldmole gpu-check" + ("" if cuda else " --dry-run") + ":\n  " + "\n  ".join(steps), flush=True)
    if args.plan_only:
        return 0
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)", "torch": torch.__version__,
              "plan": steps, "steps": {}}
    for name, step in (("parity", lambda: parity(device)), ("graphs", lambda: graphs(device)),
                       ("memcheck", memcheck if cuda else lambda: {"skipped": "needs CUDA"}),
                       ("bench", lambda: bench(cuda))):
        start = time.perf_counter()
        try:
            report["steps"][name] = step()
        except Exception as exc:  # one failing step must not lose the others' figures
            report["steps"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        report["steps"][name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {json.dumps(report['steps'][name])[:400]}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = [n for n, s in report["steps"].items() if "error" in s or s.get("ok") is False
              or any(isinstance(v, dict) and v.get("ok") is False for v in s.values())]
    return 1 if failed else 0


def add_parser(sub) -> None:
    g = sub.add_parser("gpu-check", help="the prepared device check: parity, CUDA graphs vs eager, memcheck and "
                       "bench beside the cost model's estimates, into one JSON file")
    g.add_argument("--out", default="gpu_check.json", help="JSON file to write (default gpu_check.json)")
    g.add_argument("--dry-run", action="store_true", help="run without CUDA: parity on the CPU (Triton's "
                   "interpreter), the static-buffer decode step without capture, the estimates; skip the rest")
    g.add_argument("--plan-only", action="store_true", help="print the plan and exit")
    g.set_defaults(func=run)
