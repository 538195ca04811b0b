"""A ServerState from `ldmole serve`'s flags: the runtime, the engine, the settings and the adapter
selector (for one process, and for every replica of a cluster)."""

from __future__ import annotations

import os
from pathlib import Path

from ldmole_runtime.adapters.default import DEFAULT_ADAPTER_NAME, resolve_adapter
from ldmole_runtime.engine.async_engine import AsyncLLMEngine
from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
from ldmole_runtime.engine.memory import describe as describe_memory
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.default_base import resolve_base
from ldmole_runtime.model.dtypes import auto_dtype
from ldmole_runtime.model.runtime import LDMoleRuntime
from ldmole_runtime.model.tokenizer import load_tokenizer
from ldmole_server.adapter_selector import AdapterSelector
from ldmole_server.protocol import check_adapter_name
from ldmole_server.state import ServerSettings, ServerState, limits_from_args


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        if spec == "default":  # the embedded adapter under its own name
            spec = f"{DEFAULT_ADAPTER_NAME}=default"
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LDMoleError(f"--adapter takes NAME=PATH, got {spec!r}")
        if name in adapters:
            raise LDMoleError(f"--adapter: the name {name!r} is given twice")
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise LDMoleError(f"--adapter: {exc}") from None
        adapters[name] = str(resolve_adapter(path))
    return adapters


def read_key(flag: str | None, path: str | None, env: str) -> str | None:
    """A key from its flag, its file (the first line) or its environment variable, in that order."""
    if flag:
        return flag
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise LDMoleError(f"cannot read the key file {path}: {exc.strerror}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise LDMoleError(f"the key file {path} is empty")
        return key
    return os.environ.get(env) or None


def settings_from_args(args) -> ServerSettings:
    settings = ServerSettings(api_key=read_key(args.api_key, args.api_key_file, "LDMOLE_API_KEY"),
                              max_body_bytes=args.max_body_bytes, limits=limits_from_args(args),
                              enable_adapter_loading=args.enable_adapter_loading,
                              adapter_roots=tuple(args.adapter_root),
                              admin_key=read_key(args.admin_key, args.admin_key_file, "LDMOLE_ADMIN_KEY"),
                              stall_timeout_s=args.stall_timeout)
    settings.check_admin_setup()
    return settings


def memory_split(engine: LLMEngine) -> str:
    """Where the server's memory goes: the base weights, the adapter slots, the host cache of sets, the KV cache."""
    kv = engine.runner.kv_cache
    return describe_memory(engine.memory, kv.numel() * kv.element_size(), engine.block_manager.num_blocks)


def build_state(args, executor=None) -> ServerState:
    base = resolve_base(args.base)
    adapters = parse_adapters(args.adapter or [])
    name = args.served_model_name or base.name
    if name in adapters:
        raise LDMoleError(f"the adapter name {name!r} is the base model's served name; choose another")
    dtype, why = auto_dtype(args.device) if args.dtype == "auto" else (args.dtype, "as --dtype asked")
    runtime = LDMoleRuntime.from_pretrained(base, adapters=adapters, dtype=dtype, device=args.device)
    tokenizer = load_tokenizer(base)
    config = EngineConfig(kv_cache_gib=args.kv_cache_gib, memory_gib=args.memory_gib, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                          lora_backend=args.lora_backend, decode_graphs=args.decode_graphs,
                          check_blocks=args.debug_check_blocks, max_loras=args.max_loras,
                          max_cpu_loras=args.max_loras or 0 if args.max_cpu_loras is None else args.max_cpu_loras,
                          adapter_dir=args.adapter_dir, pinned_adapters=tuple(args.pin))
    engine = AsyncLLMEngine(LLMEngine(runtime, tokenizer, config), max_queue=args.max_queue, executor=executor,
                            max_unread_tokens=args.max_unread_tokens)
    settings = settings_from_args(args)
    selector = None
    if args.adapter_selector:
        selector = AdapterSelector(args.adapter_selector, args.adapter_selector_labels, runtime, tokenizer)
        selector.check_targets([name] + list(adapters))
    elif args.adapter_selector_labels:
        raise LDMoleError("--adapter-selector-labels needs --adapter-selector")
    return ServerState(engine, name, str(base), adapters, settings, adapter_selector=selector,
                       dtype_choice=f"{dtype} ({'auto: ' if args.dtype == 'auto' else ''}{why})")
