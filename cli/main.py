"""`ldmole` command line: forward (verification), import (reference checkpoint -> native)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from ldmole_cli.bench_commands import add_bench_parsers
from ldmole_cli.gpu_check import add_parser as add_gpu_check_parser
from ldmole_cli.kernel_compile import add_parser as add_compile_kernels_parser
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.lora.ops import LORA_BACKENDS


def cmd_forward(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from ldmole_runtime.model.runtime import LDMoleRuntime

    try:
        inputs = load_file(args.inputs)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LDMoleError(f"{args.inputs}: not a readable safetensors file ({exc})") from exc
    if "input_ids" not in inputs:
        raise LDMoleError(f"{args.inputs}: no 'input_ids' tensor (found {sorted(inputs)})")
    input_ids = inputs["input_ids"]
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise LDMoleError(
            f"{args.inputs}: input_ids must be an integer tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}"
        )

    adapters = {"adapter": args.adapter} if args.adapter else {}
    rt = LDMoleRuntime.from_pretrained(args.base, adapters=adapters, dtype=args.dtype, device=args.device)
    out = rt.forward(input_ids, "adapter" if args.adapter else None, lora_backend=args.lora_backend,
                     capture_routing=bool(args.adapter))
    tensors = {"logits": out.logits.float()}
    tensors |= {f"routing.{k}": v.float() for k, v in out.routing.items()}
    router = rt.bank.slots[0].router if args.adapter else None
    if router is not None and router.needs_lambda:
        tensors |= {f"lambda.{k}": v.float() for k, v in out.lambdas.items()}
    if router is not None and router.needs_threshold:  # AdaMoLE: a threshold per token and projection
        tensors |= {f"threshold.{k}": v.float() for k, v in out.thresholds.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, args.out)
    print(f"wrote {len(tensors)} tensors to {args.out} (logits {tuple(out.logits.shape)})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ldmole_runtime.adapters.adapter_set import AdapterSet
    from ldmole_runtime.model.config import ModelConfig

    adapter = AdapterSet.load_foreign(args.reference)
    if args.base:
        adapter.validate_for(ModelConfig.from_dir(args.base), str(args.reference))
    out = adapter.save(args.out)
    AdapterSet.load_native(out)  # read it back: what was written must load
    c = adapter.config
    print(f"imported {args.reference} -> {out}: E={c.num_experts} r={c.rank} router={c.router} "
          f"layers={c.num_layers} targets={','.join(c.target_modules)}"
          + (f" score head ({c.num_labels} labels)" if c.num_labels else ""))
    return 0


def cmd_train_selector(args: argparse.Namespace) -> int:
    from ldmole_runtime.training.train_selector import train_selector

    overrides = dict(base=args.base, out=args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                     rank=args.rank, alpha=2.0 * args.rank, seed=args.seed, device=args.device, progress=False)
    metrics = train_selector(args.data, args.val_data, args.val_fraction, overrides, args.tasks, args.limit_per_task)
    last = metrics["epochs"][-1]["validation"] if metrics["epochs"] else {}
    selector = Path(args.out).resolve() / "adapter"
    print(json.dumps({"accuracy": last.get("accuracy"), "labels": metrics["labels"], "selector": str(selector)}))
    print(f"serve it: ldmole serve --base {shlex.quote(args.base)} --adapter-selector {shlex.quote(str(selector))} "
          + " ".join(f"--adapter {name}=..." for name in metrics["labels"].values()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ldmole_runtime.training.config import TrainConfig
    from ldmole_runtime.training.trainer import train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.no_progress:
        overrides["progress"] = False
    cfg = TrainConfig.from_sources(args.config, overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    name = args.load_as or Path(cfg.out).resolve().name
    if args.load_into and main_rank:
        from ldmole_runtime.training.load_into import probe

        probe(args.load_into, name, args.api_key)
    metrics = train(cfg)
    last = metrics["epochs"][-1] if metrics["epochs"] else {}
    if main_rank:
        adapter = str(Path(cfg.out).resolve() / "adapter")
        print(f"done: adapter in {cfg.out}/adapter, metrics in {cfg.out}/metrics.json; "
              f"last validation {json.dumps(last.get('validation', {}))}")
        if cfg.epochs > 0 and args.load_into:
            from ldmole_runtime.training.load_into import load_into

            load_into(args.load_into, name, adapter, args.api_key)
            print(f"loaded into {args.load_into} as {name!r} (listed in /v1/models)")
        elif cfg.epochs > 0:
            print(f"serve it: ldmole serve --base {shlex.quote(cfg.base)} "
                  f"--adapter {shlex.quote(name)}={shlex.quote(adapter)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ldmole_runtime.training.compare import compare, format_table
    from ldmole_runtime.training.config import TrainConfig

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    overrides["progress"] = not args.no_progress
    cfg = TrainConfig.from_sources(args.config, overrides)
    table = compare(cfg, [r.strip() for r in args.rows.split(",") if r.strip()], Path(args.out),
                    make_plot=not args.no_plot)
    print(format_table(table))
    print(f"written: {args.out}/compare.json" + ("" if args.no_plot else f", {args.out}/compare.png"))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ldmole_runtime.adapters.default import resolve_adapter
    from ldmole_runtime.engine.llm import LLM
    from ldmole_runtime.engine.sampling_params import SamplingParams

    adapters = {"adapter": str(resolve_adapter(args.adapter))} if args.adapter else {}
    llm = LLM(args.base, adapters=adapters, dtype=args.dtype, device=args.device)
    name = "adapter" if args.adapter else None
    if args.choices:
        choices = args.choices.split("|")
        res = llm.score(args.prompt, choices, adapter=name)
        for i, (choice, s) in enumerate(zip(choices, res.choices, strict=True)):
            mark = "*" if i == res.best else " "
            print(
                f"{mark} {choice!r}: sum logprob {s.sum_logprob:.4f}, mean {s.mean_logprob:.4f}, greedy {s.is_greedy}"
            )
        return 0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    out = llm.generate([args.prompt], params, adapter=name)[0].outputs[0]
    print(out.text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ldmole_cli.report import run_report
    from ldmole_runtime.data.datasets import MCExample, load_dataset, mc_prompt, special_tokens

    examples = load_dataset(args.data, args.task, args.split, args.limit)
    if not examples:
        raise LDMoleError(f"{args.data}: no examples")
    texts = []
    tokenizer = None
    for ex in examples:
        if isinstance(ex, MCExample):
            if tokenizer is None:
                from ldmole_runtime.model.default_base import resolve_base
                from ldmole_runtime.model.tokenizer import load_tokenizer
                tokenizer = load_tokenizer(resolve_base(args.base), needed_for="multiple-choice prompts")
            texts.append(mc_prompt(ex, special_tokens(tokenizer)[0]))
        else:
            texts.append(getattr(ex, "text", None) or getattr(ex, "prompt", "") + getattr(ex, "completion", ""))
    stats = run_report(args.base, args.adapter, texts, args.out, batch_size=args.batch_size, max_length=args.max_length,
                       tokenizer=tokenizer, token_texts=args.token_texts)
    print(f"wrote the routing report for {args.adapter} on {len(texts)} texts to {args.out} "
          f"(mean active experts {stats.get('mean_active_experts', float('nan')):.3f})")
    return 0


def _bench_slora(args: argparse.Namespace) -> int:
    from ldmole_cli.slora_workload import run_slora

    if args.num_adapters < 1 or args.alpha <= 0 or args.rate <= 0 or args.cv <= 0 or args.duration <= 0:
        raise LDMoleError("--num-adapters, --alpha, --rate, --cv and --duration must be positive")
    try:
        lengths = (_int_range(args.input_range, "--input-range"), _int_range(args.output_range, "--output-range"))
        result = run_slora(args.url, args.num_adapters, args.alpha, args.rate, args.cv, args.duration, *lengths,
                           args.api_key, args.seed, args.server_pid)
    except OSError as exc:
        raise LDMoleError(f"cannot reach the server at {args.url}: {exc}") from exc
    except ValueError as exc:
        raise LDMoleError(str(exc)) from exc
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def cmd_make_adapters(args: argparse.Namespace) -> int:
    from ldmole_cli.slora_workload import make_adapter_copies
    from ldmole_runtime.adapters.adapter_set import AdapterSet
    from ldmole_runtime.adapters.default import resolve_adapter

    if args.num < 1 or args.noise < 0:
        raise LDMoleError("--num must be >= 1 and --noise >= 0")
    like = AdapterSet.load(resolve_adapter(args.like))
    paths = make_adapter_copies(like, args.num, Path(args.out), args.noise, args.seed)
    print(f"wrote {len(paths)} adapter sets to {args.out} ({paths[0].name} ... {paths[-1].name})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ldmole_server.launch import serve

    return serve(args)


def _int_range(text: str, flag: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(",")
    try:
        low, high = int(lo), int(hi)
    except ValueError:
        low = high = 0
    if not sep or not 1 <= low < high:
        raise LDMoleError(f"{flag} takes LOW,HIGH with 1 <= LOW < HIGH (HIGH excluded), got {text!r}")
    return low, high


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from ldmole_cli.bench_serve import bench_serve

    if args.workload == "slora":
        return _bench_slora(args)
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not concurrency or min(concurrency) < 1:
        raise LDMoleError(f"--concurrency takes positive integers, got {args.concurrency!r}")
    try:
        result = bench_serve(args.url, concurrency, args.num_requests, args.prompt_words, args.max_tokens, args.rounds,
                             args.api_key)
    except OSError as exc:  # httpx connection errors derive from it too
        raise LDMoleError(f"cannot reach the server at {args.url}: {exc}") from exc
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    from ldmole_eval.task_configs import TASKS_DIR

    if args.path:
        print(TASKS_DIR)
        return 0
    names = sorted(p.stem for p in TASKS_DIR.glob("ldmole_*.yaml"))
    print(f"lm-eval tasks shipped with ldmole (offline; pass --include_path {TASKS_DIR}):")
    for name in names:
        form = "letter-choice form (the LD-MoLE paper's prompt)" if name.endswith("_letter") else "cloze form"
        print(f"  {name:32s} {form}")
    print("groups: ldmole_cloze, ldmole_letter (every task in that form)")
    return 0


def _add_train_flags(t: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from dataclasses import fields

    from ldmole_runtime.training.config import TrainConfig, field_help

    helps = field_help()
    t.add_argument("--config", help="YAML file of settings (flags override it)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if f.name == "progress" or f.name in skip:
            continue
        if kind == "bool":
            t.add_argument(flag, action="store_true", default=None, dest=f.name, help=helps[f.name])
        elif "list" in kind:
            conv = (lambda s: [int(x) for x in s.split(",")]) if "int" in kind else (lambda s: s.split(","))
            t.add_argument(flag, type=conv, dest=f.name,
                           help=f"{helps[f.name]} (comma-separated; default {','.join(map(str, f.default_factory()))})")
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            t.add_argument(flag, type=conv, dest=f.name, help=f"{helps[f.name]} (default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmole", description="Serving runtime for LD-MoLE adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("forward", help="run one full forward and write logits and routing (verification)")
    f.add_argument("--base", required=True, help="HF model folder (config.json + safetensors)")
    f.add_argument("--adapter", help="adapter folder, native or reference LD-MoLE format; omit for the bare base")
    f.add_argument("--inputs", required=True, help="safetensors file with input_ids [B, T]")
    f.add_argument("--out", required=True, help="safetensors file to write")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights and the computation (default float32)")
    f.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    f.add_argument("--lora-backend", "--mode", dest="lora_backend", default="sparse", choices=LORA_BACKENDS,
                   help="the adapters' compute: sparse (only experts with p > 0, the fastest backend for the "
                   "device), dense (all experts, the torch reference), or a backend by name: torch, cpu, triton")
    f.set_defaults(func=cmd_forward)

    i = sub.add_parser("import", help="convert a checkpoint of the reference LD-MoLE or AdaMoLE code to the "
                       "native format")
    i.add_argument("reference", help="folder with adapter_config.json + adapter_model.bin (LD-MoLE or AdaMoLE)")
    i.add_argument("--out", required=True, help="native adapter folder to write")
    i.add_argument("--base", help="optional base model folder to validate the adapter against")
    i.set_defaults(func=cmd_import)
    add_bench_parsers(sub)
    add_compile_kernels_parser(sub)
    add_gpu_check_parser(sub)

    t = sub.add_parser("train", help="train an LD-MoLE adapter (runs data-parallel under torchrun)")
    _add_train_flags(t)
    t.add_argument("--load-into", metavar="URL", help="when done, load the adapter into the `ldmole serve` at URL "
                   "(e.g. http://127.0.0.1:8000) through its load endpoint; checked before training starts")
    t.add_argument("--load-as", metavar="NAME", help="model name for --load-into and the printed serve command "
                   "(default: the --out folder's name)")
    t.add_argument("--api-key", help="for --load-into: the key the server's adapter loading takes, its admin key "
                                     "(else its API key); default: $LDMOLE_ADMIN_KEY, then $LDMOLE_API_KEY")
    t.set_defaults(func=cmd_train)

    tr = sub.add_parser("train-selector", aliases=["train-router"],
                        help="train an adapter selector for `ldmole serve --adapter-selector`: a classifier over "
                        "adapter-set names, from labelled prompts (train-router: its older name)")
    tr.add_argument("--data", help='JSONL of {"text": prompt, "adapter": adapter-set name}')
    tr.add_argument("--tasks", metavar="DATASET=ADAPTER,...", help="instead of --data: built-in multiple-choice "
                    "datasets' questions, each labelled with an adapter-set name (e.g. arc_easy=arc,social_iqa=siqa); "
                    "trained on their train splits, validated on their validation splits")
    tr.add_argument("--limit-per-task", type=int, help="with --tasks: at most this many questions per dataset and "
                    "split (default: all)")
    tr.add_argument("--val-data", help="held-out JSONL of the same form (default: --val-fraction of --data)")
    tr.add_argument("--val-fraction", type=float, default=0.2,
                    help="share of each adapter's examples held out for validation when --val-data is not given "
                    "(default 0.2)")
    tr.add_argument("--base", default="default", help="base model folder, or 'default' (SmolLM2-135M-Instruct)")
    tr.add_argument("--out", default="runs/selector",
                    help="run folder; the selector is OUT/adapter (default runs/selector)")
    tr.add_argument("--epochs", type=int, default=2, help="passes over the training prompts (default 2)")
    tr.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    tr.add_argument("--batch-size", type=int, default=8, help="prompts per step (default 8)")
    tr.add_argument("--rank", type=int, default=8, help="LoRA rank of the classifier's adapter (default 8)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the data order (default 0)")
    tr.add_argument("--device", default="auto", help="cpu, cuda, or auto (default auto)")
    tr.set_defaults(func=cmd_train_selector)

    c = sub.add_parser("compare", help="train and evaluate, on the same items: the zero-shot base, plain LoRA at "
                       "an equal parameter budget, LD-MoLE with the paper recipe and with the sparse recipe; "
                       "prints accuracies with 95%% intervals and McNemar tests, writes JSON and a plot")
    from ldmole_runtime.training.compare import ROW_SETTINGS

    _add_train_flags(c, skip=("out", *ROW_SETTINGS))  # the rows set these; --out is the comparison's
    c.add_argument("--out", default="runs/compare", help="folder of the comparison: one run folder per row, "
                   "compare.json and compare.png (finished rows of the same settings are reused)")
    c.add_argument("--rows", default=",".join(("base", "lora", "paper", "sparse")),
                   help="rows to run, comma-separated, from base, lora, paper, sparse (default all four)")
    c.add_argument("--no-plot", action="store_true", help="write compare.json only, no compare.png")
    c.set_defaults(func=cmd_compare)

    g = sub.add_parser("generate", help="generate with (or score choices under) an adapter")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--base", default="default", help="base model folder, or 'default' (SmolLM2-135M-Instruct)")
    g.add_argument("--adapter", help="adapter folder (native or reference); omit for the bare base")
    g.add_argument("--choices", help="'|'-separated continuations to score instead of generating")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--seed", type=int, help="sampling seed, for reproducible samples")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights and the computation (default float32)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("report", help="plots of an adapter's learned expert allocation on some data")
    r.add_argument("adapter", help="adapter folder")
    r.add_argument("--data", required=True, help="built-in dataset name or JSONL file")
    r.add_argument("--task", help="task of a JSONL file (mc, completion, classification)")
    r.add_argument("--split", default="validation", help="split of a built-in dataset: train, validation, test")
    r.add_argument("--limit", type=int, default=200, help="number of examples to route (default 200)")
    r.add_argument("--base", default="default", help="base model folder, or 'default' (SmolLM2-135M-Instruct)")
    r.add_argument("--out", default="report", help="folder for the plots and stats (default ./report)")
    r.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8)")
    r.add_argument("--max-length", type=int, default=512, help="tokens per example, cut from the left (default 512)")
    r.add_argument("--token-texts", type=int, default=3,
                   help="how many examples token_routing.html draws token by token, as the server's /ui page "
                        "does (default 3)")
    r.set_defaults(func=cmd_report)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server for the base and its adapter sets")
    from ldmole_server.launch import add_serve_flags
    add_serve_flags(s)
    s.set_defaults(func=cmd_serve)

    bs = sub.add_parser("bench-serve", help="serving benchmark against a running server, with the offline engine "
                                            "on the same workload as the baseline")
    from ldmole_cli.bench_serve import add_bench_serve_flags
    add_bench_serve_flags(bs)
    bs.set_defaults(func=cmd_bench_serve)

    ma = sub.add_parser("make-adapters", help="write N servable adapter sets (perturbed copies of one) into a "
                                              "folder, for `serve --adapter-dir` and `bench-serve --workload slora`")
    ma.add_argument("--like", default="default", help="the set to copy: a folder, or 'default' (the embedded one)")
    ma.add_argument("--num", type=int, required=True, help="how many sets to write (set-0000, set-0001, ...)")
    ma.add_argument("--out", required=True, help="the folder to write them into")
    ma.add_argument("--noise", type=float, default=0.05,
                    help="Gaussian noise added to every tensor, relative to its standard deviation (default 0.05)")
    ma.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    ma.set_defaults(func=cmd_make_adapters)

    e = sub.add_parser("eval-tasks", help="list the offline lm-eval tasks shipped with ldmole (ARC, OBQA, CSQA, "
                                          "HellaSwag, RTE, SIQA, PIQA; cloze and letter forms)")
    e.add_argument("--path", action="store_true", help="print only their folder, for lm_eval --include_path")
    e.set_defaults(func=cmd_eval_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # training needs autograd; serve runs its own threads
        if args.command in ("train", "train-selector", "train-router", "compare", "bench-train", "serve",
                            "bench-serve"):
            return args.func(args)
        with torch.inference_mode():
            return args.func(args)
    except LDMoleError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # always one line
        print(f"ldmole {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
