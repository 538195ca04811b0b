"""`--model_args` of `lm_eval --model ldmole`, checked before anything is loaded.

    base=DIR|default                    the base model folder (default: the embedded SmolLM2-135M)
    adapter=DIR | default | NAME:DIR;NAME2:DIR2
                                        adapter sets to load; omitted: the bare base
    active=NAME                         which loaded set answers (default: the only one; "base": none)
    dtype=auto|float32|bfloat16|float16 weights' dtype (default auto: bf16 on a CPU with bf16 dot products or a
                                        GPU with bf16, fp16 on other GPUs, else fp32; LDMOLE_NO_BF16=1 rules bf16 out)
    max_length=N                        tokens per scored sequence, as the `hf` backend's max_length
    lora_backend=sparse|dense|torch|cpu|triton
                                        the adapters' compute (sparse: the device's fastest backend; dense: the
                                        torch reference; or a backend by name); `mode=` is its older name
    kv_cache_gib=F, max_num_batched_tokens=N
                                        engine sizing
    add_bos_token=true|false            as the `hf` backend's option (default: the tokenizer's own habit)

lm-eval adds `batch_size`, `max_batch_size` and `device` from its own flags. Any other key, a
missing folder, or an `active` set that is not loaded is one `LDMoleError` naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ldmole_runtime.adapters.default import DEFAULT_ADAPTER_NAME, resolve_adapter
from ldmole_runtime.engine.config import EngineConfig
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.lora.ops import LORA_BACKENDS, lora_backend_setting
from ldmole_runtime.model.default_base import DEFAULT_BASE_NAME
from ldmole_runtime.model.dtypes import DTYPE_CHOICES, auto_dtype

BASE_ONLY = "base"  # active=base: no adapter set, even when some are loaded
ENGINE = EngineConfig()  # the engine's defaults, shared with `ldmole serve` and LLM
DEFAULT_BATCH = ENGINE.max_num_seqs  # batch_size=auto: the engine's own default of sequences per step


@dataclass
class ModelArgs:
    base: str
    adapters: dict[str, str]  # name -> folder
    active: str | None  # None: the bare base
    dtype: str = "float32"  # resolved: parse() turns "auto" into what this device computes best
    device: str = "cpu"
    max_length: int | None = None
    max_num_seqs: int = DEFAULT_BATCH
    batch_size: int | str = 1  # as given, for lm-eval's bookkeeping
    lora_backend: str = ENGINE.lora_backend
    kv_cache_gib: float = ENGINE.kv_cache_gib
    max_num_batched_tokens: int = ENGINE.max_num_batched_tokens
    add_bos_token: bool | None = None


KNOWN_KEYS = ("base", "adapter", "active", "dtype", "device", "max_length", "batch_size", "max_batch_size",
              "lora_backend", "mode", "kv_cache_gib", "max_num_batched_tokens", "add_bos_token")


def parse_adapters(spec) -> dict[str, str]:
    """`DIR`, `default`, or `NAME:DIR;NAME2:DIR2` (a lone DIR is named after its folder)."""
    if spec is None or str(spec) == "":
        return {}
    adapters: dict[str, str] = {}
    for part in str(spec).split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, path = part.partition(":")
        if not sep or "/" in name or "\\" in name:  # a bare path, which may itself contain ':'
            name, path = (DEFAULT_ADAPTER_NAME if part == "default" else Path(part).name), part
        if not name or not path:
            raise LDMoleError(f"adapter={spec!r}: each entry is DIR or NAME:DIR, got {part!r}")
        if name == BASE_ONLY:
            raise LDMoleError(f"adapter name {BASE_ONLY!r} is reserved for the bare base (active={BASE_ONLY})")
        if name in adapters:
            raise LDMoleError(f"adapter name {name!r} is given twice in adapter={spec!r}")
        folder = resolve_adapter(path)
        if not folder.is_dir():
            raise LDMoleError(f"adapter {name!r}: {folder} is not a folder")
        adapters[name] = str(folder)
    return adapters


def _int(key: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LDMoleError(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def _batch(batch_size, max_batch_size) -> int:
    """Sequences per engine step: batch_size as given, or for `auto` the engine's default (capped
    by max_batch_size), since the engine sizes its batches to its KV cache itself."""
    text = str(batch_size)
    if text.startswith("auto"):
        cap = DEFAULT_BATCH if max_batch_size in (None, "") else _int("max_batch_size", max_batch_size)
        return min(DEFAULT_BATCH, cap)
    try:
        return _int("batch_size", int(text))
    except ValueError:
        raise LDMoleError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}") from None


def _device(device) -> str:
    """cpu or cuda[:N]. Like the `hf` backend, a CUDA device on a machine without one (lm-eval's
    command line defaults to cuda:0) falls back to the CPU with a warning."""
    import torch

    device = "" if device is None else str(device)
    if device and not (device == "cpu" or device.startswith("cuda")):
        raise LDMoleError(f"device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("ldmole.eval").warning("device=%s, but this machine has no CUDA device: using cpu", device)
        return "cpu"
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_model_args(kwargs: dict) -> ModelArgs:
    unknown = sorted(set(kwargs) - set(KNOWN_KEYS))
    if unknown:
        raise LDMoleError(f"unknown model_args key(s) {', '.join(unknown)}; known: {', '.join(KNOWN_KEYS)}")
    base = str(kwargs.get("base") or "default")
    if not Path(base).exists() and base not in ("default", DEFAULT_BASE_NAME):
        raise LDMoleError(f"base={base}: no such folder")
    adapters = parse_adapters(kwargs.get("adapter"))
    active = kwargs.get("active")
    if active in (None, ""):
        if len(adapters) > 1:
            raise LDMoleError(f"several adapter sets are loaded ({', '.join(adapters)}); "
                              f"pick one with active=NAME (or active={BASE_ONLY})")
        active = next(iter(adapters), None)
    else:
        active = str(active)
        if active == BASE_ONLY:
            active = None
        elif active not in adapters:
            known = ", ".join(adapters) or "none"
            raise LDMoleError(f"active={active}: no adapter set of that name is loaded (loaded: {known}; "
                              f"{BASE_ONLY} means the bare base)")
    dtype = str(kwargs.get("dtype") or "auto")
    if dtype not in DTYPE_CHOICES:
        raise LDMoleError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    device = _device(kwargs.get("device"))
    if dtype == "auto":
        dtype = auto_dtype(device)[0]
    lora_backend = str(lora_backend_setting(kwargs.get("lora_backend") or None, kwargs.get("mode") or None,
                                            ENGINE.lora_backend))
    if lora_backend not in LORA_BACKENDS:
        raise LDMoleError(f"lora_backend must be one of {', '.join(LORA_BACKENDS)}, got {lora_backend!r}")
    max_length = kwargs.get("max_length")
    kv = kwargs.get("kv_cache_gib", ENGINE.kv_cache_gib)
    if isinstance(kv, bool) or not isinstance(kv, (int, float)) or kv <= 0:
        raise LDMoleError(f"kv_cache_gib must be a positive number, got {kv!r}")
    add_bos = kwargs.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise LDMoleError(f"add_bos_token must be true or false, got {add_bos!r}")
    batch_size = kwargs.get("batch_size", 1)
    return ModelArgs(
        base=base, adapters=adapters, active=active, dtype=dtype, device=device,
        max_length=None if max_length in (None, "") else _int("max_length", max_length, low=2),
        max_num_seqs=_batch(batch_size, kwargs.get("max_batch_size")), batch_size=batch_size, lora_backend=lora_backend,
        kv_cache_gib=float(kv),
        max_num_batched_tokens=_int("max_num_batched_tokens",
                                    kwargs.get("max_num_batched_tokens", ENGINE.max_num_batched_tokens), low=16),
        add_bos_token=add_bos)
