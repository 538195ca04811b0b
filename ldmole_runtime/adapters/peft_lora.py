"""Load a plain PEFT LoRA folder as an E = 1 adapter set.

`adapter_config.json` (`peft_type` "LORA") and `adapter_model.safetensors` (or `adapter_model.bin`,
read with `weights_only=True`) with, per adapted module of the decoder,

    base_model.model.model.layers.{L}.{self_attn|mlp}.{proj}.lora_A.weight [r_m, in]
    base_model.model.model.layers.{L}.{self_attn|mlp}.{proj}.lora_B.weight [out, r_m]

Every module may have its own rank r_m (`rank_pattern`) and alpha (`alpha_pattern`), and the scaling
is alpha / r_m, or alpha / sqrt(r_m) with `use_rslora`. The set's rank is the largest r_m (smaller
ones zero-padded, which adds exact zeros) and each module's scaling is folded into its B, so the set
is an ordinary E = 1 set of scaling 1. Modules of layers the adapter skips (`layers_to_transform`)
get zero weights. What this cannot express is refused: DoRA, LoRA bias, `bias` other than "none",
`fan_in_fan_out`, and `modules_to_save` other than a classification head.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldmole_runtime.adapters.files import read_json_object, read_state_dict
from ldmole_runtime.adapters.spec import ALL_PROJECTIONS, AdapterConfig, AdapterParts, hidden_size_of, tensor_key
from ldmole_runtime.errors import CheckpointError

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_HEADS = {"score", "classifier"}  # a sequence-classification head, kept as the set's own head
_REFUSED = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "LoRA with a bias on B (lora_bias) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D weights) is not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters (LoRA on parameters, not modules) is not supported",
}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{st}: not a readable safetensors file ({exc})") from exc
    if pt.is_file():
        return read_state_dict(pt)
    raise CheckpointError(f"{path}: missing adapter_model.safetensors (or adapter_model.bin)")


def _pattern_value(patterns: dict, module: str, default):
    """peft's own rule: a pattern applies when the module's name ends with it (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(raw: dict, source: Path) -> None:
    for field, why in _REFUSED.items():
        if raw.get(field):
            raise CheckpointError(f"{source}: {why}")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{source}: bias {raw['bias']!r} is not supported (only 'none')")
    extra = sorted(set(raw.get("modules_to_save") or []) - _HEADS)
    if extra:
        raise CheckpointError(f"{source}: modules_to_save {extra} is not supported (only a classification head: "
                              f"{sorted(_HEADS)})")
    for name in ("r", "lora_alpha"):
        v = raw.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise CheckpointError(f"{source}: field {name!r} must be a positive number, got {v!r}")


def read_peft(path: str | Path) -> AdapterParts:
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    raw = read_json_object(cfg_file)
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {raw.get('peft_type')!r} is not a PEFT LoRA adapter")
    _check_config(raw, cfg_file)
    sd = _weights(path)

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        parts = key.split(".")
        if key.startswith("base_model.model.") and parts[2] in _HEADS and parts[-1] in ("weight", "bias"):
            head[parts[-1]] = t  # the classification head (modules_to_save)
            continue
        m = _KEY.match(key)
        if not m:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (not a LoRA weight of a decoder projection)")
        layer, proj = int(m.group(1)), m.group(3)
        if proj not in ALL_PROJECTIONS:
            raise CheckpointError(f"{path}: {key!r} adapts {proj!r}, which is not a projection of a decoder layer "
                                  f"({', '.join(ALL_PROJECTIONS)})")
        pairs.setdefault((layer, proj), {})[m.group(4)] = t
    if not pairs:
        raise CheckpointError(f"{path}: no LoRA weights")
    for (layer, proj), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: layer {layer} {proj} has lora_{''.join(ab)} without its pair")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"{path}: layer {layer} {proj}: lora_A {tuple(A.shape)} and lora_B "
                                  f"{tuple(B.shape)} do not share a rank")

    num_layers = max(layer for layer, _ in pairs) + 1
    targets = [p for p in ALL_PROJECTIONS if any(proj == p for _, proj in pairs)]
    shapes = {proj: [ab["A"].shape[1], ab["B"].shape[0]] for (_, proj), ab in pairs.items()}
    rank = max(ab["A"].shape[0] for ab in pairs.values())
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        for proj in targets:
            fan_in, fan_out = shapes[proj]
            A, B = torch.zeros(1, rank, fan_in), torch.zeros(1, fan_out, rank)
            ab = pairs.get((layer, proj))
            if ab is not None:
                if [ab["A"].shape[1], ab["B"].shape[0]] != [fan_in, fan_out]:
                    raise CheckpointError(f"{path}: layer {layer} {proj} has a different shape than layer 0's")
                r = ab["A"].shape[0]
                A[0, :r] = ab["A"].float()
                B[0, :, :r] = ab["B"].float() * _scaling(raw, layer, proj, r, cfg_file)
            tensors[tensor_key(layer, proj, "lora_A")], tensors[tensor_key(layer, proj, "lora_B")] = A, B

    num_labels = None
    if "weight" in head:
        tensors["score.weight"] = head["weight"].float()
        num_labels = head["weight"].shape[0]
        if "bias" in head:
            tensors["score.bias"] = head["bias"].float()
    config = AdapterConfig(
        num_experts=1, rank=rank, alpha=float(rank), router="none", target_modules=targets, num_layers=num_layers,
        projection_shapes=shapes, hidden_size=hidden_size_of(shapes),
        num_labels=num_labels, base_model=raw.get("base_model_name_or_path") or "")
    config.check(str(cfg_file))
    return AdapterParts(config, {k: v.contiguous() for k, v in tensors.items()}, str(path))


def _scaling(raw: dict, layer: int, proj: str, r: int, source: Path) -> float:
    module = f"model.layers.{layer}.{'self_attn' if proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{proj}"
    want_r = _pattern_value(raw.get("rank_pattern") or {}, module, raw["r"])
    if want_r != r:
        raise CheckpointError(f"{source}: {module} has rank {r} in the weights, but the config says {want_r}")
    alpha = _pattern_value(raw.get("alpha_pattern") or {}, module, raw["lora_alpha"])
    return alpha / math.sqrt(r) if raw.get("use_rslora") else alpha / r
