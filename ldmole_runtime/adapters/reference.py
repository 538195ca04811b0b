"""Import checkpoints written by the reference LD-MoLE training code (eshentw/LD-MoLE).

That code saves `adapter_config.json` and `adapter_model.bin`, a pickled flat state dict with one
tensor per expert and a copy of the shared λ-network in every adapted module. Here the experts are
stacked, the λ copies are checked to be equal and kept once. The pickle is only ever read with
`weights_only=True`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ldmole_runtime.adapters.files import read_json_object, read_state_dict
from ldmole_runtime.adapters.spec import (
    ALL_PROJECTIONS,
    AdapterConfig,
    AdapterParts,
    hidden_size_of,
    lambda_key,
    tensor_key,
)
from ldmole_runtime.errors import CheckpointError

REFERENCE_CONFIG_NAME = "adapter_config.json"
REFERENCE_WEIGHTS_NAME = "adapter_model.bin"

_MODULE_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.(lora_A\d+|lora_B\d+|lora_route|sparsegen\.mlp\.proj_layers)\.?(.*)$")
_LAMBDA_TOP = "base_model.sparsegen_fn.mlp.proj_layers."
_SCORE_KEYS = ("base_model.model.score.weight", "base_model.model.score.modules_to_save.default.weight")


def _read_config(path: Path) -> dict:
    raw = read_json_object(path)
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return raw


def _router_kind(raw: dict, num_experts: int) -> str:
    if num_experts == 1:
        return "none"
    sparsegen_cfg = raw.get("sparsegen_cfg") or {}
    enabled = sparsegen_cfg.get("enabled", raw.get("sparsegen", False))
    return "sparsegen" if enabled else "softmax"


def _single_lambda_net(sd: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """All λ-network copies (one per adapted module, plus a top-level one) must be equal."""
    copies: dict[str, dict[str, torch.Tensor]] = {}  # owner -> {"{width}.{0|2}.{weight|bias}": tensor}
    for key, t in sd.items():
        if key.startswith(_LAMBDA_TOP):
            copies.setdefault("base_model.sparsegen_fn", {})[key[len(_LAMBDA_TOP):]] = t
        elif ".sparsegen.mlp.proj_layers." in key:
            owner, part = key.split(".sparsegen.mlp.proj_layers.")
            copies.setdefault(owner, {})[part] = t
    if not copies:
        return {}
    owners = sorted(copies)
    first = copies[owners[0]]
    for owner in owners[1:]:
        other = copies[owner]
        if set(other) != set(first):
            raise CheckpointError(f"{source}: λ-network copy in {owner} has parts {sorted(other)}, "
                                  f"but {owners[0]} has {sorted(first)}")
        for part, t in first.items():
            if other[part].shape != t.shape or not torch.equal(other[part], t):
                raise CheckpointError(f"{source}: λ-network copies differ: {owner}.{part} != {owners[0]}.{part}; "
                                      "the λ-network is shared, so every saved copy must be identical")
    return {lambda_key(*part.split(".", 1)): t for part, t in first.items()}


def read_reference(path: str | Path) -> AdapterParts:
    path = Path(path)
    cfg_file, weights_file = path / REFERENCE_CONFIG_NAME, path / REFERENCE_WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {f.name}")
    raw = _read_config(cfg_file)
    sd = read_state_dict(weights_file)

    num_experts = int(raw.get("lora_nums") or 1)
    rank = int(raw["r"])
    router = _router_kind(raw, num_experts)
    targets = [m for m in ALL_PROJECTIONS if m in raw["target_modules"]]
    unknown = [m for m in raw["target_modules"] if m not in ALL_PROJECTIONS]
    if unknown:
        raise CheckpointError(f"{cfg_file}: target_modules {unknown} are not supported projections")

    # per (layer, proj): {"A": {e: t}, "B": {e: t}, "route": t}
    modules: dict[tuple[int, str], dict] = {}
    for key, t in sd.items():
        m = _MODULE_KEY.match(key)
        if not m:
            continue
        layer, proj, part, _ = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        entry = modules.setdefault((layer, proj), {"A": {}, "B": {}})
        if part.startswith("lora_A"):
            entry["A"][int(part[6:])] = t
        elif part.startswith("lora_B"):
            entry["B"][int(part[6:])] = t
        elif part == "lora_route":
            entry["route"] = t
    if not modules:
        raise CheckpointError(f"{weights_file}: no LoRA expert weights found (is this an LD-MoLE checkpoint?)")
    num_layers = max(layer for layer, _ in modules) + 1

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for layer in range(num_layers):
        for proj in targets:
            entry = modules.get((layer, proj))
            where = f"{weights_file}: layer {layer} {proj}"
            if entry is None:
                raise CheckpointError(f"{where}: missing (target_modules lists it)")
            if sorted(entry["A"]) != list(range(num_experts)) or sorted(entry["B"]) != list(range(num_experts)):
                raise CheckpointError(f"{where}: expected lora_A0..{num_experts - 1} and lora_B0..{num_experts - 1}, "
                                      f"found A{sorted(entry['A'])} B{sorted(entry['B'])}")
            try:
                A = torch.stack([entry["A"][e] for e in range(num_experts)])
                B = torch.stack([entry["B"][e] for e in range(num_experts)])
            except RuntimeError as exc:
                raise CheckpointError(f"{where}: experts have different shapes ({exc})") from exc
            if A.dim() != 3 or B.dim() != 3 or A.shape[1] != rank or B.shape[2] != rank:
                raise CheckpointError(f"{where}: lora_A {tuple(A.shape[1:])} / lora_B {tuple(B.shape[1:])} "
                                      f"do not have rank r={rank}")
            shapes[proj] = [A.shape[2], B.shape[1]]
            tensors[tensor_key(layer, proj, "lora_A")] = A
            tensors[tensor_key(layer, proj, "lora_B")] = B
            if router != "none":
                if "route" not in entry:
                    raise CheckpointError(f"{where}: missing lora_route (the router)")
                tensors[tensor_key(layer, proj, "router")] = entry["route"]

    lambda_tensors = _single_lambda_net(sd, weights_file) if router == "sparsegen" else {}
    tensors |= lambda_tensors
    widths = sorted({int(k.split(".")[1]) for k in lambda_tensors})
    lambda_hidden = next((t.shape[0] for k, t in lambda_tensors.items() if k.endswith("0.weight")), None)

    hidden_size = hidden_size_of(shapes)
    num_labels = None
    score = next((sd[k] for k in _SCORE_KEYS if k in sd), None)
    if score is not None:
        tensors["score.weight"] = score
        num_labels = score.shape[0]

    config = AdapterConfig(
        num_experts=num_experts, rank=rank, alpha=float(raw["lora_alpha"]), router=router,
        target_modules=targets, num_layers=num_layers, projection_shapes=shapes, hidden_size=int(hidden_size),
        lambda_hidden=int(lambda_hidden) if lambda_hidden else None, lambda_widths=widths,
        num_labels=num_labels, base_model=raw.get("base_model_name_or_path") or "",
    )
    config.check(str(cfg_file))
    return AdapterParts(config, {k: v.contiguous() for k, v in tensors.items()}, str(weights_file))
