"""Router kinds as every kernel numbers them: the C kernel's `ROUTER_*` enum (cpu/ldmole_cpu.c) and
the Triton routing kernel's `kind` column of `set_info` (triton/routing.py). The runtime names a
router by its config string ("sparsegen", ...); `RouterKind.of` is the one translation."""

from __future__ import annotations

from enum import IntEnum


class RouterKind(IntEnum):
    SPARSEGEN = 0  # LD-MoLE: Sparsegen-lin with a λ predicted per token
    SOFTMAX = 1
    NONE = 2  # a single expert (E = 1): p = 1
    TOPK = 3
    THRESHOLD = 4  # AdaMoLE: softmax, then experts above a learned threshold

    @classmethod
    def of(cls, router: str) -> RouterKind:
        return cls[router.upper()]


# the kinds the C kernel implements; others take the torch path on CPU
CPU_KERNEL_KINDS = frozenset({RouterKind.SPARSEGEN, RouterKind.SOFTMAX, RouterKind.NONE})
