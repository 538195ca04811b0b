"""Fresh adapter sets for a base: the starting point of training, and random sets for tests/benchmarks.

A follows LoRA's kaiming-uniform init and B starts at zero (so a fresh set leaves the base
unchanged), unless `b_std` asks for random B, which tests and benchmarks use so that every part
of the math moves the output.
"""

from __future__ import annotations

import functools
import math

import torch

from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.adapters.spec import ALL_PROJECTIONS, AdapterConfig, lambda_key, projection_shapes, tensor_key
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.lora.routing import ROUTERS
from ldmole_runtime.model.config import ModelConfig


def _kaiming_uniform(shape: tuple[int, ...], fan_in: int, g: torch.Generator) -> torch.Tensor:
    # nn.Linear's default (kaiming_uniform with a = sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def new_adapter_set(base: ModelConfig, num_experts: int = 8, rank: int = 8, alpha: float = 16.0,
                    router: str | None = None, target_modules: list[str] | None = None, lambda_hidden: int = 256,
                    num_labels: int | None = None, seed: int = 0, b_std: float = 0.0,
                    lambda_bias: float = 0.0, lambda_init: str | None = None, top_k: int | None = None) -> AdapterSet:
    """A new LD-MoLE set shaped for `base`. `lambda_bias` shifts λ's pre-activation (negative: denser).

    `lambda_init` follows the reference code's λ-network strategies: "kaiming" (LoRA-style weights),
    "sparse" (weights U(0, 0.5): λ near its cap, few experts) or "dense" (U(-0.5, 0)), every bias
    -2.5. None keeps nn.Linear's default init (used by tests and benchmarks)."""
    if lambda_init not in (None, "kaiming", "sparse", "dense"):
        raise LDMoleError(f"unknown lambda_init {lambda_init!r}; choose kaiming, sparse or dense")
    router = router or ("none" if num_experts == 1 else "sparsegen")
    targets = [m for m in ALL_PROJECTIONS if m in (target_modules or ALL_PROJECTIONS)]
    shapes = projection_shapes(base)
    widths = sorted({shapes[m][0] for m in targets}) if ROUTERS[router].needs_lambda else []
    config = AdapterConfig(
        num_experts=num_experts, rank=rank, alpha=alpha, router=router, target_modules=targets,
        num_layers=base.num_layers, projection_shapes={m: list(shapes[m]) for m in targets},
        hidden_size=base.hidden_size, lambda_hidden=lambda_hidden if widths else None, lambda_widths=widths,
        num_labels=num_labels, top_k=top_k if router == "topk" else None)
    config.check()

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(base.num_layers):
        for proj in targets:
            fan_in, fan_out = shapes[proj]
            key = functools.partial(tensor_key, layer, proj)
            tensors[key("lora_A")] = _kaiming_uniform((num_experts, rank, fan_in), fan_in, g)
            tensors[key("lora_B")] = torch.randn((num_experts, fan_out, rank), generator=g) * b_std
            if ROUTERS[router].needs_logits:
                tensors[key("router")] = _kaiming_uniform((num_experts, fan_in), fan_in, g)
            if ROUTERS[router].needs_threshold:  # AdaMoLE's threshold layer: nn.Linear(in, 1)'s default init
                tensors[key("threshold.weight")] = _kaiming_uniform((1, fan_in), fan_in, g)
                tensors[key("threshold.bias")] = _kaiming_uniform((1,), fan_in, g)
    for w in widths:
        for layer, (fan_out, fan_in) in (("0", (lambda_hidden, w)), ("2", (1, lambda_hidden))):
            if lambda_init == "sparse":
                weight = torch.rand((fan_out, fan_in), generator=g) * 0.5
            elif lambda_init == "dense":
                weight = -torch.rand((fan_out, fan_in), generator=g) * 0.5
            else:
                weight = _kaiming_uniform((fan_out, fan_in), fan_in, g)
            bias = torch.full((fan_out,), -2.5) if lambda_init else _kaiming_uniform((fan_out,), fan_in, g)
            tensors[lambda_key(w, f"{layer}.weight")] = weight
            tensors[lambda_key(w, f"{layer}.bias")] = bias + (lambda_bias if layer == "2" else 0.0)
    if num_labels is not None:
        tensors["score.weight"] = torch.randn((num_labels, base.hidden_size), generator=g) * base.hidden_size ** -0.5
    adapter = AdapterSet(config, tensors)
    adapter.check_tensors("new adapter set")
    return adapter
