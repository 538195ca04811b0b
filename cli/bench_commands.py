"""`ldmole bench` and `ldmole bench-train`: the speed commands, kept apart from the rest of the CLI."""

from __future__ import annotations

import argparse
import json

from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.dtypes import DTYPE_CHOICES, auto_dtype


def cmd_bench(args: argparse.Namespace) -> int:
    from ldmole_cli.bench import SHAPES, BenchSettings, run

    if args.shape not in SHAPES:
        raise LDMoleError(f"unknown shape {args.shape!r}; choose one of {sorted(SHAPES)}")
    dtype = args.dtype
    if dtype == "auto":  # an --estimate is for a GPU that computes in bf16, whatever this machine has
        dtype = "bfloat16" if args.estimate else auto_dtype(args.device)[0]
    settings = BenchSettings(shape=args.shape, dtype=dtype, device=args.device, base=args.base,
                             adapter=args.adapter, target_experts=args.target_experts, text=args.text,
                             lora_backend=args.lora_backend, decode_graphs=args.decode_graphs)
    if args.adapter is not None and args.target_experts is not None:
        raise LDMoleError("--adapter routes as it was trained; --target-experts calibrates a random adapter: "
                          "give one of them")
    if args.quick:
        settings.prompt_len, settings.decode_steps, settings.prefill_prompts, settings.prefill_len = 16, 4, 1, 128
    if args.batch_sizes:
        try:
            settings.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
        except ValueError:
            raise LDMoleError(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}") from None
    elif args.device.startswith("cuda"):
        settings.batch_sizes = (1, 8, 32, 128)
    if args.estimate:
        from ldmole_cli.cost_model import estimate

        if args.base or args.adapter:
            raise LDMoleError("--estimate models random-weight shapes (--shape); it takes no --base or --adapter")
        result = {"shape": args.shape, "dtype": dtype, **estimate(
            args.shape, dtype, args.estimate, settings.batch_sizes, settings.experts, settings.rank,
            settings.lambda_hidden, args.target_experts or settings.experts / 2)}
    else:
        result = run(settings)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from ldmole_cli.bench import SHAPES
    from ldmole_cli.bench_train import TrainBenchSettings, run

    if args.shape not in SHAPES:
        raise LDMoleError(f"unknown shape {args.shape!r}; choose one of {sorted(SHAPES)}")
    for name in ("experts", "rank", "lambda_hidden", "batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise LDMoleError(f"--{name.replace('_', '-')} must be >= 1")
    settings = TrainBenchSettings(shape=args.shape, experts=args.experts, rank=args.rank,
                                  lambda_hidden=args.lambda_hidden, preset=args.preset,
                                  target_modules=args.target_modules.split(",") if args.target_modules else None,
                                  batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps)
    print(json.dumps(run(settings)))
    return 0


def cmd_bench_hf(args: argparse.Namespace) -> int:
    from ldmole_cli.bench_hf import run

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise LDMoleError(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}") from None
    for name in ("prompt_len", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise LDMoleError(f"--{name.replace('_', '-')} must be >= 1")
    if min(sizes) < 1:
        raise LDMoleError("--batch-sizes must be >= 1")
    print(json.dumps(run(args.base, args.dtype, sizes, args.prompt_len, args.new_tokens, args.rounds,
                         None if args.text == "none" else args.text)))
    return 0


def add_bench_parsers(sub) -> None:
    b = sub.add_parser("bench", help="decode/prefill throughput: bare base vs LD-MoLE sparse vs dense all-experts")
    b.add_argument("--json", action="store_true", help="print one JSON object on one line")
    b.add_argument("--quick", action="store_true", help="fewer steps (under a minute on 2 CPU cores)")
    b.add_argument("--shape", default="smollm2-135m", help="model shape with random weights: smollm2-135m, qwen3-0.6b, "
                   "qwen3-1.7b, tiny")
    b.add_argument("--batch-sizes", help="decode batch sizes, comma-separated (default 1,8,32; on cuda 1,8,32,128)")
    b.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype of the weights (default auto: bf16 on a CPU with bf16 dot products or a GPU with bf16, "
                        "fp16 on other GPUs, else fp32; LDMOLE_NO_BF16=1 rules bf16 out)")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    b.add_argument("--base", help="a real base model folder, or 'default' (SmolLM2-135M-Instruct), instead of "
                   "--shape's random weights; prompts are then cut from real text (--text)")
    b.add_argument("--adapter", help="a real adapter folder, or 'default', on its base (--base, default 'default'): "
                   "speed under the routing it learned")
    b.add_argument("--target-experts", type=float, help="calibrate the random adapter's λ-network so that tokens "
                   "use this many active experts on average (1 to E)")
    b.add_argument("--text", default="social_iqa", help="built-in dataset whose validation text makes the prompts "
                   "of a real base (default social_iqa)")
    b.add_argument("--lora-backend", default="sparse", choices=["sparse", "cpu", "triton", "torch"],
                   help="backend of the bare-base and LD-MoLE variants (default sparse: the C kernel on CPU, "
                   "Triton on CUDA); the dense variant always runs the torch reference")
    b.add_argument("--decode-graphs", default="auto", choices=["auto", "off", "eager"],
                   help="decode steps replayed from CUDA graphs: auto (on a GPU with the triton backend), off, or "
                   "eager (the static-buffer step without capture)")
    b.add_argument("--estimate", choices=["h100", "a100"], help="do not measure: a roofline ESTIMATE of the decode "
                   "step on that GPU from the launches the backend issues (cli/cost_model.py); runs without a GPU. "
                   "--target-experts sets the active experts per token (default E/2)")
    b.set_defaults(func=cmd_bench)

    h = sub.add_parser("bench-hf", help="the bare base on ldmole's engine against transformers' generate: greedy, "
                       "same prompts, rounds interleaved in one process, medians; prints one JSON object")
    h.add_argument("--base", default="default", help="base model folder, or 'default' (SmolLM2-135M-Instruct)")
    h.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="dtype of both models (default auto: bf16 on a CPU with bf16 dot products, else fp32)")
    h.add_argument("--batch-sizes", default="1,8", help="prompts per generate call, comma-separated (default 1,8)")
    h.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (default 64)")
    h.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt, EOS ignored (default 32)")
    h.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size, after one warm-up (default 5)")
    h.add_argument("--text", default="social_iqa", help="built-in dataset whose validation text makes the prompts, "
                   "or 'none' for random token ids (default social_iqa)")
    h.set_defaults(func=cmd_bench_hf)

    bt = sub.add_parser("bench-train", help="training tokens/s (CPU): LD-MoLE against plain LoRA of rank E·r, "
                        "steps interleaved on the same batches, medians; prints one JSON object")
    bt.add_argument("--shape", default="smollm2-135m", help="model shape with random weights: smollm2-135m, "
                    "qwen3-0.6b, tiny (default smollm2-135m)")
    bt.add_argument("--experts", type=int, default=8, help="LoRA experts per projection, E (default 8)")
    bt.add_argument("--rank", type=int, default=8, help="rank of each expert, r; LoRA gets E·r (default 8)")
    bt.add_argument("--lambda-hidden", type=int, default=256, help="λ-network hidden width (default 256)")
    bt.add_argument("--target-modules", help="projections to adapt, comma-separated (default all seven)")
    bt.add_argument("--preset", default="paper", choices=["paper", "sparse"],
                    help="LD-MoLE's routing recipe (its loss terms are part of the step)")
    bt.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    bt.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    bt.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    bt.set_defaults(func=cmd_bench_train)

