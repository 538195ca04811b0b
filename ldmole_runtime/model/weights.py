"""Load a base model's weights from an HF folder (`model.safetensors` or a sharded index).

HF keeps q/k/v and gate/up as separate tensors; here they are copied into the fused weights once,
at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ldmole_runtime.errors import CheckpointError
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.model.decoder import DecoderModel


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) {missing} are missing")
        return files
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _targets(model: DecoderModel) -> dict[str, tuple[torch.Tensor, slice]]:
    """HF tensor name -> (our parameter, the rows it fills): q/k/v and gate/up share a fused weight."""
    cfg = model.cfg
    out: dict[str, tuple[torch.Tensor, slice]] = {}

    def put(name: str, param: torch.Tensor | None, start: int = 0, stop: int | None = None) -> None:
        if param is not None:
            out[name] = (param, slice(start, param.shape[0] if stop is None else stop))

    put("model.embed_tokens.weight", model.embed.weight)
    put("model.norm.weight", model.norm.weight)
    put("lm_head.weight", model.lm_head)
    put("score.weight", model.score)
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        put(p + "input_layernorm.weight", layer.input_norm.weight)
        put(p + "post_attention_layernorm.weight", layer.post_attention_norm.weight)
        attn, mlp = layer.attn, layer.mlp
        for name, start, stop in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
            put(p + f"self_attn.{name}.weight", attn.qkv.weight, start, stop)
            put(p + f"self_attn.{name}.bias", attn.qkv.bias, start, stop)
        put(p + "self_attn.o_proj.weight", attn.o.weight)
        put(p + "self_attn.o_proj.bias", attn.o.bias)
        if attn.q_norm is not None:
            put(p + "self_attn.q_norm.weight", attn.q_norm.weight)
            put(p + "self_attn.k_norm.weight", attn.k_norm.weight)
        for name, start, stop in (("gate_proj", 0, inter), ("up_proj", inter, 2 * inter)):
            put(p + f"mlp.{name}.weight", mlp.gate_up.weight, start, stop)
            put(p + f"mlp.{name}.bias", mlp.gate_up.bias, start, stop)
        put(p + "mlp.down_proj.weight", mlp.down.weight)
        put(p + "mlp.down_proj.bias", mlp.down.bias)
    return out


def load_base_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DecoderModel:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: base model folder does not exist")
    cfg = ModelConfig.from_dir(path)
    model = DecoderModel(cfg)
    targets = _targets(model)
    filled: set[str] = set()
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name not in targets:
                        continue  # e.g. rotary caches or heads this runtime does not use
                    param, rows = targets[name]
                    t = f.get_tensor(name)
                    want = (rows.stop - rows.start, *param.shape[1:])
                    if tuple(t.shape) != want:
                        raise CheckpointError(f"{file}: {name} has shape {tuple(t.shape)}, the config implies {want}")
                    with torch.no_grad():
                        param[rows].copy_(t)
                    filled.add(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    missing = sorted(set(targets) - filled)
    if missing:
        raise CheckpointError(f"{path}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
