"""`ldmole serve`: load the base and adapter sets, build the app, run uvicorn, drain on SIGTERM."""

from __future__ import annotations

import json
import logging
import shlex
import signal
import threading

import uvicorn

from ldmole_runtime.adapters.default import DEFAULT_ADAPTER_NAME
from ldmole_runtime.engine.config import EngineConfig
from ldmole_runtime.engine.main_thread_executor import MainThreadExecutor
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.lora.ops import LORA_BACKENDS
from ldmole_runtime.model.default_base import resolve_base
from ldmole_runtime.model.dtypes import DTYPE_CHOICES
from ldmole_server.app import build_app
from ldmole_server.build import build_state, memory_split, parse_adapters, read_key
from ldmole_server.state import ServerState, add_limit_flags


def curl_examples(state: ServerState, url: str) -> list[str]:
    """Ready-to-paste calls: a completion under the first adapter set, one under the base, a score."""
    auth = ' -H "Authorization: Bearer $LDMOLE_API_KEY"' if state.settings.api_key else ""
    # SocialIQA's cloze form (lm-eval's prompt), the task of the embedded default adapter
    question = "Q: Casey won the race after months of training. How would Casey feel?\nA:"
    choices = [" proud", " bored", " sad"]
    adapter = next(iter(state.adapter_paths), None)

    def call(path: str, body: dict) -> str:
        return (f"curl -s {url}{path} -H 'Content-Type: application/json'{auth} "
                f"-d {shlex.quote(json.dumps(body))}")

    lines = []
    if adapter:
        lines.append(call("/v1/completions", {"model": adapter, "prompt": question, "max_tokens": 8, "temperature": 0}))
    lines.append(call("/v1/completions", {"model": state.base_name, "prompt": "The capital of France is",
                                          "max_tokens": 12, "temperature": 0}))
    lines.append(call("/v1/score", {"model": adapter or state.base_name, "context": question, "choices": choices}))
    return lines


def check_exposure(args) -> None:
    """An address beyond this machine needs an API key, unless the flag says otherwise."""
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    if not loopback and not read_key(args.api_key, args.api_key_file, "LDMOLE_API_KEY") and \
            not args.allow_unauthenticated:
        raise LDMoleError(f"--host {args.host} serves beyond this machine without an API key: give "
                          "--api-key-file (or $LDMOLE_API_KEY), or pass --allow-unauthenticated")
    for flag in ("api_key", "admin_key"):
        if getattr(args, flag):
            logging.getLogger("ldmole.server").warning(
                "--%s is visible to every user of this machine (ps); prefer --%s-file or $LDMOLE_%s",
                flag.replace("_", "-"), flag.replace("_", "-"), flag.upper())


def serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_exposure(args)
    if args.replicas < 1:
        raise LDMoleError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas > 1 or args.address:
        from ldmole_server.cluster import run_cluster  # ray is an optional extra

        base = resolve_base(args.base)
        return run_cluster(args, parse_adapters(args.adapter or []), args.served_model_name or base.name)
    executor = MainThreadExecutor()
    state = build_state(args, executor)
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"

    def on_ready() -> None:
        names = state.model_names()
        served = ", ".join(names[:8]) + (f", ... ({len(names)} in all: GET /v1/models)" if len(names) > 8 else "")
        print(f"dtype: {state.dtype_choice}", flush=True)
        print(memory_split(state.engine.engine), flush=True)
        print(f"\nldmole is serving {served} at {url} (OpenAI API under /v1; metrics at /metrics)\n"
              f"Routing, live, in a browser: {url}/ui\n"
              "Try:\n" + "\n".join(curl_examples(state, url)) + "\n", flush=True)

    app = build_app(state, on_ready)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout)
    server = uvicorn.Server(config)

    def on_signal(sig, frame) -> None:
        # the first SIGTERM/SIGINT drains: new requests are refused at once (kept-alive connections
        # included) and uvicorn stops accepting; running ones finish. A second one stops at once.
        state.engine.draining = True
        server.handle_exit(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    # uvicorn's event loop runs in a thread; the engine's steps run here, on the main thread
    http = threading.Thread(target=server.run, name="ldmole-http", daemon=True)
    http.start()
    executor.run_until(lambda: not http.is_alive())
    return 0 if server.started else 1


def add_serve_flags(s) -> None:
    s.add_argument("--base", default="default",
                   help="base model: an HF folder (Llama/Qwen3), or 'default' for the embedded SmolLM2-135M-Instruct")
    s.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="serve an adapter set under NAME (repeatable); PATH is a native or reference LD-MoLE folder, "
                        "or 'default' for the embedded default adapter; '--adapter default' alone serves that "
                        f"adapter as {DEFAULT_ADAPTER_NAME!r}")
    s.add_argument("--served-model-name", help="the `model` name of the bare base (default: the base folder's name)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: $LDMOLE_API_KEY, "
                                     "else no key); visible to other users in `ps`: prefer --api-key-file")
    s.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE (its first line)")
    s.add_argument("--allow-unauthenticated", action="store_true",
                   help="listen on an address other than localhost without an API key (refused otherwise)")
    s.add_argument("--enable-adapter-loading", action="store_true",
                   help="turn on /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default: 404); needs "
                        "--adapter-root and a key (the admin key, else the API key)")
    s.add_argument("--adapter-root", action="append", metavar="DIR", default=[],
                   help="with --enable-adapter-loading: a folder whose subfolders may be loaded (repeatable; "
                        "lora_path is resolved with realpath and must lie under one)")
    s.add_argument("--admin-key", help="the key adapter loading and unloading need, instead of the API key "
                                       "(default: $LDMOLE_ADMIN_KEY); visible in `ps`: prefer --admin-key-file")
    s.add_argument("--admin-key-file", metavar="FILE", help="read the admin key from FILE (its first line)")
    d = EngineConfig()  # the engine's defaults, shared with LLM and lm_eval --model ldmole
    s.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_gib,
                   help=f"memory for the paged KV cache, in GiB (default {d.kv_cache_gib:g}; see --memory-gib)")
    s.add_argument("--memory-gib", type=float, metavar="GIB",
                   help="the engine's memory in all, in GiB: base weights, adapter slots, the host cache of sets "
                        "(on a CPU) and the KV cache, which gets what the others leave (replaces --kv-cache-gib)")
    s.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help=f"most sequences in one batch (default {d.max_num_seqs})")
    s.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget of one engine step: prefill chunks + decodes "
                        f"(default {d.max_num_batched_tokens})")
    s.add_argument("--max-model-len", type=int,
                   help="longest prompt + completion in tokens (default: the model's max_position_embeddings)")
    s.add_argument("--max-loras", type=int, metavar="N",
                   help="adapter sets on the compute device at once, so at most N distinct sets per step; more "
                        "sets wait for a slot and the least recently used idle set is evicted (default: every "
                        "loaded set stays on the device)")
    s.add_argument("--max-cpu-loras", type=int, metavar="M",
                   help="sets kept read in host memory beyond the device's, ready to copy into a slot, least "
                        "recently used dropped first (default: as many as --max-loras)")
    s.add_argument("--adapter-dir", metavar="DIR",
                   help="serve every subfolder of DIR as an adapter set under its folder name (native, LD-MoLE "
                        "or AdamoLE reference, or PEFT LoRA), read on its first request")
    s.add_argument("--pin", action="append", metavar="NAME", default=[],
                   help="never evict this set from the device once it is there (repeatable; the sets given "
                        "with --adapter are always pinned)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="waiting requests beyond which new ones get 503 (default 256)")
    s.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                   help="largest accepted request body; bigger ones get 413 (default 8 MiB)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish before they are aborted (default 30)")
    s.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights and activations dtype (default auto: bfloat16 on a CPU with bf16 dot products or a "
                        "GPU with bf16, float16 on other GPUs, else float32; LDMOLE_NO_BF16=1 rules bf16 out)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    s.add_argument("--lora-backend", default=d.lora_backend, choices=LORA_BACKENDS,
                   help="the adapters' compute: sparse (default: the C kernel on CPU, Triton on CUDA), dense (all "
                        "experts, the torch reference), or a backend by name: torch, cpu, triton")
    s.add_argument("--adapter-selector", "--request-router", metavar="DIR",
                   help="serve `model: \"auto\"`: a sequence-classification model folder (transformers, e.g. "
                        "BERT-tiny) or an adapter set with a classification head (`ldmole train-selector`) picks "
                        "the adapter set of each such request from its prompt (a chat's last user message); "
                        "--request-router is its older name")
    s.add_argument("--adapter-selector-labels", "--request-router-labels", metavar="JSON",
                   help="the adapter selector's label map, {\"0\": \"adapter-name\", ...} (default: the folder's "
                        "selector_labels.json, else the model's id2label)")
    s.add_argument("--replicas", type=int, default=1,
                   help="engine replicas behind one endpoint, on Ray Serve (each with its own engine and KV "
                        "cache; requests of one adapter set stick to one replica); default 1: no Ray")
    s.add_argument("--address", help="Ray cluster to run on: 'auto' or host:port joins a running one, 'local' "
                                     "starts a new local one (also what --replicas N > 1 alone does); implies "
                                     "Ray Serve even with --replicas 1")
    s.add_argument("--metrics-port", type=int,
                   help="with Ray Serve: the port of Ray's metrics endpoint, one Prometheus target with every "
                        "replica's ldmole metrics (label `replica`); default: Ray picks one")
    s.add_argument("--cpus-per-replica", type=float, default=0.0,
                   help="CPUs Ray reserves for each replica, also its torch threads (default 0: no reservation, "
                        "and each replica gets (this machine's cores - 1) / replicas threads)")
    s.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs Ray gives each replica (e.g. 1 with --device cuda; default 0)")
    s.add_argument("--decode-graphs", default=d.decode_graphs, choices=["auto", "off"],
                   help="replay decode steps from CUDA graphs: auto (on a GPU with the triton backend) or off "
                        "(every step launched eagerly, as vLLM's --enforce-eager)")
    add_limit_flags(s)
    s.add_argument("--max-unread-tokens", type=int, default=8192,
                   help="a stream whose client has left this many generated tokens unread is cut off with an error "
                        "and its request aborted (default 8192)")
    s.add_argument("--stall-timeout", type=float, default=60.0,
                   help="seconds work may wait with no engine step finishing before /health answers 503 (a "
                        "stuck engine; default 60)")
    s.add_argument("--debug-check-blocks", action="store_true",
                   help="after every engine step, check that each KV-cache block in use belongs to a running, "
                        "waiting or held sequence; a broken check fails the requests in flight (debugging; "
                        "costs a pass over the block table per step)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
