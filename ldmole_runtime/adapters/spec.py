"""What an LD-MoLE adapter set is: its config, and where its projections sit in a decoder layer.

Projections that read the same input are grouped (q/k/v, gate/up): the runtime computes their λ
once and their router logits in one matmul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from ldmole_runtime.errors import CheckpointError
from ldmole_runtime.lora.routing import ROUTERS
from ldmole_runtime.model.config import ModelConfig

# group name -> projections that share one input, in the column order of the fused base weight
PROJECTION_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
ALL_PROJECTIONS: tuple[str, ...] = tuple(p for group in PROJECTION_GROUPS.values() for p in group)

FORMAT_VERSION = 1


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) width of every projection of a decoder layer of this base."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }


def hidden_size_of(shapes: dict[str, list[int]]) -> int:
    """The base's hidden size, read off adapted projections' [in, out] widths: o_proj and down_proj
    write it, every other projection reads it."""
    proj, (fan_in, fan_out) = next(iter(shapes.items()))
    return int(fan_out if proj in ("o_proj", "down_proj") else fan_in)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_width_pair(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(w) and w > 0 for w in v)



def tensor_key(layer: int, proj: str, part: str) -> str:
    """The native format's key of one projection's tensor: lora_A, lora_B, router, threshold.weight, ..."""
    return f"layers.{layer}.{proj}.{part}"


def lambda_key(width: int, part: str) -> str:
    """The tensor key of one part of the λ-network for inputs of this width."""
    return f"lambda.{width}.{part}"


class AdapterParts(NamedTuple):
    """What a reader of another code's format returns; AdapterSet checks and wraps it."""
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    source: str  # the file the tensors came from, for error messages

@dataclass
class AdapterConfig:
    num_experts: int
    rank: int
    alpha: float
    router: str  # a key of routing.ROUTERS
    target_modules: list[str]
    num_layers: int
    projection_shapes: dict[str, list[int]]  # proj -> [in, out], for validation against a base
    hidden_size: int
    lambda_hidden: int | None = None  # λ-network width; None when the router needs no λ
    lambda_widths: list[int] = field(default_factory=list)
    num_labels: int | None = None  # set when the adapter carries its own classification head
    top_k: int | None = None  # experts per token for router "topk"
    max_threshold: float | None = None  # router "threshold" (AdaMoLE): the cap τmax; None means 1 / num_experts
    base_model: str = ""  # informational: what it was trained on
    format_version: int = FORMAT_VERSION

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def threshold_cap(self) -> float:
        return 1.0 / self.num_experts if self.max_threshold is None else float(self.max_threshold)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "adapter config") -> AdapterConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown fields {unknown}")
        try:
            cfg = cls(**d)
        except TypeError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
        cfg.check(source)
        return cfg

    def _check_types(self, source: str) -> None:
        """Field types, so that a hand-edited config fails here and not deep inside torch."""
        ints = ["num_experts", "rank", "num_layers", "hidden_size", "format_version"]
        bad = [f for f in ints if not _is_int(getattr(self, f))]
        bad += [
            f for f in ("lambda_hidden", "num_labels") if getattr(self, f) is not None and not _is_int(getattr(self, f))
        ]
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            bad.append("alpha")
        if not isinstance(self.router, str):
            bad.append("router")
        if not isinstance(self.target_modules, list) or not all(isinstance(m, str) for m in self.target_modules):
            bad.append("target_modules")
        if not isinstance(self.projection_shapes, dict):
            bad.append("projection_shapes")
        if not isinstance(self.lambda_widths, list) or not all(_is_int(w) for w in self.lambda_widths):
            bad.append("lambda_widths")
        if bad:
            raise CheckpointError(f"{source}: field(s) {bad} have the wrong type "
                                  "(num_experts, rank, num_layers, hidden_size: int; alpha: number; "
                                  "router: str; target_modules: list of str; lambda_widths: list of int)")

    def check(self, source: str = "adapter config") -> None:
        """Internal consistency, independent of any base model."""
        self._check_types(source)
        if self.format_version != FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {self.format_version} is not supported (expected {FORMAT_VERSION})"
            )
        if self.router not in ROUTERS:
            raise CheckpointError(f"{source}: unknown router kind {self.router!r}; known: {sorted(ROUTERS)}")
        if self.num_experts < 1 or self.rank < 1:
            raise CheckpointError(f"{source}: num_experts and rank must be >= 1")
        if (self.router == "none") != (self.num_experts == 1):
            raise CheckpointError(f"{source}: router 'none' goes with num_experts == 1 exactly (got router "
                                  f"{self.router!r}, num_experts {self.num_experts})")
        bad = [m for m in self.target_modules if m not in ALL_PROJECTIONS]
        if bad or not self.target_modules:
            raise CheckpointError(f"{source}: target_modules {bad or '[]'} are not projections of a decoder layer "
                                  f"({', '.join(ALL_PROJECTIONS)})")
        no_shape = [m for m in self.target_modules if not _is_width_pair(self.projection_shapes.get(m))]
        if no_shape:
            raise CheckpointError(f"{source}: projection_shapes has no [in, out] for target module(s) {no_shape}")
        if self.router == "topk" and not (_is_int(self.top_k) and 1 <= self.top_k <= self.num_experts):
            raise CheckpointError(
                f"{source}: router 'topk' needs top_k in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        if self.max_threshold is not None and (isinstance(self.max_threshold, bool) or
                                               not isinstance(self.max_threshold, (int, float)) or
                                               not 0 < self.max_threshold <= 1):
            raise CheckpointError(f"{source}: max_threshold must be a number in (0, 1] or null, "
                                  f"got {self.max_threshold!r}")
        if ROUTERS[self.router].needs_lambda:
            if not self.lambda_hidden:
                raise CheckpointError(f"{source}: router {self.router!r} needs lambda_hidden")
            needed = sorted({self.projection_shapes[m][0] for m in self.target_modules})
            missing = [w for w in needed if w not in self.lambda_widths]
            if missing:
                raise CheckpointError(f"{source}: no λ-network for input width(s) {missing}")
