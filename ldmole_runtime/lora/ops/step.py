"""One forward's adapters, bound once: a layer then calls `apply(y, x, group)`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ldmole_runtime.lora.adapter_batch import AdapterBatch
    from ldmole_runtime.lora.bank import AdapterBank
    from ldmole_runtime.lora.capture import RoutingSink
    from ldmole_runtime.lora.ops import LoraBackend


class LoraStep:
    """The backend, the bank, the step's token metadata, the routing sink and the dropout of one
    forward, bound when the forward starts; every adapted projection group then passes only its
    input, its output and its (layer, group) key."""

    __slots__ = ("backend", "bank", "batch", "capture", "dropout", "active")

    def __init__(self, backend: LoraBackend, bank: AdapterBank | None, batch: AdapterBatch,
                 capture: RoutingSink | None = None, dropout: float = 0.0):
        self.backend, self.bank, self.batch, self.capture, self.dropout = backend, bank, batch, capture, dropout
        self.active = bank is not None and not batch.is_bare  # nothing to add: the bare base

    def apply(self, y: torch.Tensor, x: torch.Tensor, group: tuple[int, str]) -> None:
        """Add the adapters' delta of one projection group (layer, group name) to its fused base output y."""
        if self.active:
            gb = self.bank.groups.get(group)
            if gb is not None:  # None: no slot adapts this group
                self.backend.apply(y, x, self.bank, gb, self.batch, self.capture, self.dropout)
