"""Import checkpoints written by the reference AdaMoLE code (zefang-liu/AdaMoLE; shared/docs/ADAMOLE.md).

`adapter_config.json` (`peft_type` "ADAMOLE") and `adapter_model.bin`, a pickled flat state dict
(read with `weights_only=True`). Per adapted module, with prefix
`base_model.model.model.layers.{L}.{self_attn|mlp}.{proj}.`:

    lora_A.{e}.weight [r, in], lora_B.{e}.weight [out, r]     the experts
    lora_gating.weight [E, in]                                  the gate (our router)
    lora_threshold.weight [1, in], lora_threshold.bias [1]      the threshold layer
    moe_layer.experts.{e}.lora_{A,B}.weight                     duplicates of the experts (checked equal)

The experts are stacked into the native layout, router kind "threshold".
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from ldmole_runtime.adapters.files import read_json_object, read_state_dict
from ldmole_runtime.adapters.spec import ALL_PROJECTIONS, AdapterConfig, AdapterParts, hidden_size_of, tensor_key
from ldmole_runtime.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.bin"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(.+)$")
_PART = re.compile(r"^(?:lora_A\.(\d+)\.weight|lora_B\.(\d+)\.weight|lora_gating\.weight|lora_threshold\.weight"
                   r"|lora_threshold\.bias|moe_layer\.experts\.(\d+)\.lora_([AB])\.weight)$")


def _config_fields(raw: dict, source: Path) -> tuple[int, int, float, float | None, list[str]]:
    def number(name, kind=(int,)):
        v = raw.get(name)
        if isinstance(v, bool) or not isinstance(v, kind):
            raise CheckpointError(f"{source}: field {name!r} must be a number, got {v!r}")
        return v

    E, r, alpha = number("num_experts"), number("lora_rank"), number("lora_alpha", (int, float))
    if E < 1 or r < 1:
        raise CheckpointError(f"{source}: num_experts and lora_rank must be >= 1")
    cap = raw.get("max_threshold")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{source}: bias {raw['bias']!r} is not supported (only 'none')")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(f"{source}: target_modules must be a list of module names")
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})  # "self_attn.q_proj" targets q_proj too
    unknown = [t for t in names if t not in ALL_PROJECTIONS]
    if unknown:
        raise CheckpointError(f"{source}: target_modules {unknown} are not projections of a decoder layer")
    return E, r, float(alpha), cap, [p for p in ALL_PROJECTIONS if p in names]


def read_adamole(path: str | Path) -> AdapterParts:
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    raw = read_json_object(cfg_file)
    if raw.get("peft_type") != "ADAMOLE":
        raise CheckpointError(f"{cfg_file}: peft_type {raw.get('peft_type')!r} is not an AdaMoLE adapter")
    E, r, alpha, cap, targets = _config_fields(raw, cfg_file)
    sd = read_state_dict(weights_file)

    modules: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _KEY.match(key)
        if not m or not _PART.match(m.group(3)):
            raise CheckpointError(f"{weights_file}: unexpected tensor {key!r} (not an AdaMoLE adapter tensor)")
        layer, proj = int(m.group(1)), m.group(2)
        if proj not in targets:
            raise CheckpointError(f"{weights_file}: tensor {key!r} adapts {proj}, which target_modules "
                                  f"{targets} does not list")
        modules.setdefault((layer, proj), {})[m.group(3)] = t
    if not modules:
        raise CheckpointError(f"{weights_file}: no adapter tensors")
    num_layers = max(layer for layer, _ in modules) + 1

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for layer in range(num_layers):
        for proj in targets:
            parts = modules.get((layer, proj))
            where = f"{weights_file}: layer {layer} {proj}"
            if parts is None:
                raise CheckpointError(f"{where}: missing (target_modules lists it)")
            A, B, gate, theta, bias = _module(parts, E, r, where)
            shapes[proj] = [A.shape[2], B.shape[1]]
            key = functools.partial(tensor_key, layer, proj)
            tensors |= {key("lora_A"): A, key("lora_B"): B, key("router"): gate,
                        key("threshold.weight"): theta, key("threshold.bias"): bias}

    config = AdapterConfig(
        num_experts=E, rank=r, alpha=alpha, router="threshold" if E > 1 else "none", target_modules=targets,
        num_layers=num_layers, projection_shapes=shapes, hidden_size=hidden_size_of(shapes),
        max_threshold=cap, base_model=raw.get("base_model_name_or_path") or "")
    config.check(str(cfg_file))
    if E == 1:  # plain LoRA: the gate and threshold decide nothing
        tensors = {k: v for k, v in tensors.items() if not k.endswith(("router", "threshold.weight", "threshold.bias"))}
        if config.threshold_cap > 1:
            raise CheckpointError(f"{cfg_file}: E = 1 with max_threshold > 1 never selects its expert")
    return AdapterParts(config, {k: v.float().contiguous() for k, v in tensors.items()}, str(weights_file))


def _module(parts: dict[str, torch.Tensor], E: int, r: int, where: str):
    needed = ([f"lora_A.{e}.weight" for e in range(E)] + [f"lora_B.{e}.weight" for e in range(E)]
              + ["lora_gating.weight", "lora_threshold.weight", "lora_threshold.bias"])
    missing = [k for k in needed if k not in parts]
    if missing:
        raise CheckpointError(f"{where}: missing {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                              f"(the config says num_experts={E})")
    extra = [k for k in parts if k not in needed and not k.startswith("moe_layer.")]
    if extra:
        raise CheckpointError(f"{where}: {extra[:4]} beyond num_experts={E}")
    try:
        A = torch.stack([parts[f"lora_A.{e}.weight"] for e in range(E)])
        B = torch.stack([parts[f"lora_B.{e}.weight"] for e in range(E)])
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: experts have different shapes ({exc})") from exc
    if A.dim() != 3 or B.dim() != 3 or A.shape[1] != r or B.shape[2] != r:
        raise CheckpointError(f"{where}: lora_A {tuple(A.shape[1:])} / lora_B {tuple(B.shape[1:])} do not have "
                              f"the config's lora_rank {r}")
    fan_in = A.shape[2]
    gate, theta, bias = parts["lora_gating.weight"], parts["lora_threshold.weight"], parts["lora_threshold.bias"]
    for name, t, shape in (("lora_gating", gate, (E, fan_in)), ("lora_threshold.weight", theta, (1, fan_in)),
                           ("lora_threshold.bias", bias, (1,))):
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape}")
    for key, t in parts.items():  # the experts' duplicates must be the experts
        m = re.match(r"moe_layer\.experts\.(\d+)\.lora_([AB])\.weight", key)
        if m:
            e = int(m.group(1))
            if e >= E or not torch.equal(t, parts[f"lora_{m.group(2)}.{e}.weight"]):
                raise CheckpointError(f"{where}: {key} differs from lora_{m.group(2)}.{e}.weight")
    return A, B, gate, theta, bias
