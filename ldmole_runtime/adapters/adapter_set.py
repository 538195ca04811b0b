"""One trained LD-MoLE adapter set and its native on-disk format.

A folder holds `ldmole_adapter.json` (an `AdapterConfig`) and `adapter.safetensors` with experts
already stacked for compute:

    layers.{L}.{proj}.lora_A   [E, r, in]
    layers.{L}.{proj}.lora_B   [E, out, r]
    layers.{L}.{proj}.router   [E, in]          (not for E = 1)
    layers.{L}.{proj}.threshold.weight [1, in], .threshold.bias [1]   (router "threshold": AdaMoLE)
    lambda.{in}.0.weight [h, in], lambda.{in}.0.bias [h], lambda.{in}.2.weight [1, h], lambda.{in}.2.bias [1]
    score.weight [num_labels, hidden]           (optional classification head; score.bias optional)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldmole_runtime.adapters.adamole import read_adamole
from ldmole_runtime.adapters.files import read_json_object
from ldmole_runtime.adapters.peft_lora import read_peft
from ldmole_runtime.adapters.reference import REFERENCE_CONFIG_NAME, read_reference
from ldmole_runtime.adapters.spec import AdapterConfig, AdapterParts, lambda_key, projection_shapes, tensor_key
from ldmole_runtime.errors import AdapterMismatchError, CheckpointError
from ldmole_runtime.lora.routing import ROUTERS
from ldmole_runtime.model.config import ModelConfig

CONFIG_NAME = "ldmole_adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
# an adapter selector's label map ({"0": "adapter-set name", ...}), beside a set with a classification head
SELECTOR_LABELS_NAME = "selector_labels.json"
LEGACY_SELECTOR_LABELS_NAME = "router_labels.json"  # what `ldmole train-router` wrote before the rename


@dataclass
class AdapterSet:
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]

    # ---- shapes -------------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        E, r = c.num_experts, c.rank
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(c.num_layers):
            for proj in c.target_modules:
                fan_in, fan_out = c.projection_shapes[proj]
                shapes[tensor_key(layer, proj, "lora_A")] = (E, r, fan_in)
                shapes[tensor_key(layer, proj, "lora_B")] = (E, fan_out, r)
                if ROUTERS[c.router].needs_logits:
                    shapes[tensor_key(layer, proj, "router")] = (E, fan_in)
                if ROUTERS[c.router].needs_threshold:
                    shapes[tensor_key(layer, proj, "threshold.weight")] = (1, fan_in)
                    shapes[tensor_key(layer, proj, "threshold.bias")] = (1,)
        if ROUTERS[c.router].needs_lambda:
            h = c.lambda_hidden
            for w in c.lambda_widths:
                shapes |= {lambda_key(w, "0.weight"): (h, w), lambda_key(w, "0.bias"): (h,),
                           lambda_key(w, "2.weight"): (1, h), lambda_key(w, "2.bias"): (1,)}
        if c.num_labels is not None:
            shapes["score.weight"] = (c.num_labels, c.hidden_size)
        return shapes

    def check_tensors(self, source: str) -> None:
        expected = self.expected_shapes()
        optional = {"score.bias": (self.config.num_labels,)} if self.config.num_labels is not None else {}
        missing = sorted(set(expected) - set(self.tensors))
        if missing:
            raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        extra = sorted(set(self.tensors) - set(expected) - set(optional))
        if extra:
            raise CheckpointError(f"{source}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for name, t in self.tensors.items():
            want = expected.get(name, optional.get(name))
            if tuple(t.shape) != tuple(want):
                raise CheckpointError(
                    f"{source}: tensor {name} has shape {tuple(t.shape)}, config implies {tuple(want)}"
                )
            if not t.is_floating_point():
                raise CheckpointError(f"{source}: tensor {name} is {t.dtype}, expected a floating-point tensor")

    def validate_for(self, base: ModelConfig, name: str = "adapter") -> None:
        """Raise AdapterMismatchError naming the first way this set does not fit `base`."""
        c = self.config
        if c.num_layers != base.num_layers:
            raise AdapterMismatchError(f"{name}: adapter has {c.num_layers} layers, base model has {base.num_layers}")
        if c.hidden_size != base.hidden_size:
            raise AdapterMismatchError(
                f"{name}: adapter hidden size {c.hidden_size} != base hidden size {base.hidden_size}"
            )
        base_shapes = projection_shapes(base)
        for proj in c.target_modules:
            if tuple(c.projection_shapes[proj]) != base_shapes[proj]:
                raise AdapterMismatchError(
                    f"{name}: {proj} is (in={c.projection_shapes[proj][0]}, out={c.projection_shapes[proj][1]}) "
                    f"in the adapter but (in={base_shapes[proj][0]}, out={base_shapes[proj][1]}) in the base model")

    # ---- native format --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(path / WEIGHTS_NAME),
                  metadata={"format": "ldmole-adapter"})
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load_native(cls, path: str | Path) -> AdapterSet:
        path = Path(path)
        cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (cfg_file, weights_file):
            if not f.is_file():
                raise CheckpointError(f"{path}: missing {f.name}")
        config = AdapterConfig.from_dict(read_json_object(cfg_file), source=str(cfg_file))
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights_file}: not a readable safetensors file ({exc})") from exc
        adapter = cls(config, tensors)
        adapter.check_tensors(str(weights_file))
        return adapter

    @classmethod
    def from_parts(cls, parts: AdapterParts) -> AdapterSet:
        adapter = cls(parts.config, parts.tensors)
        adapter.check_tensors(parts.source)
        return adapter

    @classmethod
    def load(cls, path: str | Path) -> AdapterSet:
        """Load any supported format: a native folder, or one written by another code (`load_foreign`)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: adapter folder does not exist")
        if (path / CONFIG_NAME).is_file():
            return cls.load_native(path)
        return cls.load_foreign(path)

    @staticmethod
    def load_foreign(path: str | Path) -> AdapterSet:
        """A folder with `adapter_config.json`, told apart by its fields: the reference LD-MoLE code
        (`lora_nums` / `sparsegen`), the reference AdaMoLE code (`peft_type` ADAMOLE), or PEFT's own
        LoRA (`peft_type` LORA)."""
        path = Path(path)
        if not (path / REFERENCE_CONFIG_NAME).is_file():
            raise CheckpointError(f"{path}: neither {CONFIG_NAME} (native) nor {REFERENCE_CONFIG_NAME} "
                                  "(LD-MoLE or AdaMoLE reference code) found")
        raw = read_json_object(path / REFERENCE_CONFIG_NAME)
        kind = raw.get("peft_type")
        if kind == "ADAMOLE":
            return AdapterSet.from_parts(read_adamole(path))
        if kind == "LORA" and any(k in raw for k in ("lora_nums", "sparsegen", "sparsegen_cfg")):
            return AdapterSet.from_parts(read_reference(path))
        if kind == "LORA":
            return AdapterSet.from_parts(read_peft(path))
        raise CheckpointError(f"{path / REFERENCE_CONFIG_NAME}: peft_type {kind!r} is not supported (LORA: PEFT "
                              "LoRA or the LD-MoLE reference code; ADAMOLE: the AdaMoLE reference code)")


def load_reference(path: str | Path) -> AdapterSet:
    """An adapter saved by the reference LD-MoLE code (peft's adapter_config.json + weights)."""
    return AdapterSet.from_parts(read_reference(path))
