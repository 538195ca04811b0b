"""Where the engine's memory goes: the base weights, the adapter slots, the host cache of sets, the KV cache.

Given a total (`EngineConfig.memory_gib`, the server's `--memory-gib`), the KV cache gets what the
others leave, as vLLM sizes its cache after the weights and the LoRA slots. The slots are counted
at the shape of the sets known at start (those loaded, else the first folder of the adapter dir
that this base can serve): a later set of a bigger shape lays the slots out again, larger, and
that growth is logged, not taken back from the KV cache. The host cache counts against the total on a CPU, where
it shares the memory; on a GPU it lives in host memory, outside the device's total.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.errors import LDMoleError

logger = logging.getLogger("ldmole.memory")


@dataclass(frozen=True)
class MemoryReserve:
    """What the engine holds besides the KV cache, in bytes."""
    base: int
    slots: int  # every slot, used or not
    host: int  # the host cache of sets, full (and the sets read ahead for waiting requests)
    host_counted: bool  # whether the host cache shares the total with the rest (a CPU engine)
    shaped_by: str | None  # what sized the slots; None: no set known yet, they are sized by the first one

    @property
    def total(self) -> int:
        return self.base + self.slots + (self.host if self.host_counted else 0)


def reserve_for(runtime, max_loras: int | None, max_cpu_loras: int, adapter_dir: str | None) -> MemoryReserve:
    bank = runtime.bank
    base = sum(p.numel() * p.element_size() for p in runtime.model.parameters())
    shape, shaped_by = None, None
    if bank.geometry.experts:
        shaped_by = "the sets loaded at start"
    elif adapter_dir is not None:
        shape, shaped_by = _first_servable_config(Path(adapter_dir), runtime.cfg)
    if shaped_by is None:
        return MemoryReserve(base, 0, 0, runtime.device.type != "cuda", None)
    slots = bank.storage_bytes_at(max_loras or max(bank.capacity, 1), shape)
    # the host cache keeps sets as they were read (fp32), whatever the engine's dtype; reads ahead
    # for waiting requests add up to one set per slot
    host = (max_cpu_loras + (max_loras or 0)) * bank.storage_bytes_at(1, shape, torch.float32)
    return MemoryReserve(base, slots, host, runtime.device.type != "cuda", shaped_by)


def kv_bytes_within(total_gib: float, reserve: MemoryReserve) -> int:
    """The KV cache's share of a total: what the reserve leaves."""
    kv = int(total_gib * 2**30) - reserve.total
    if kv <= 0:
        raise LDMoleError(f"a memory total of {total_gib:g} GiB leaves nothing for the KV cache: "
                          f"{describe(reserve, 0)}; raise --memory-gib or lower --max-loras/--max-cpu-loras")
    return kv


def describe(reserve: MemoryReserve, kv: int, blocks: int | None = None) -> str:
    """One line for the start-up log."""
    def mib(n: float) -> str:
        return f"{n / 2**20:,.1f} MiB"

    slots = (f"adapter slots {mib(reserve.slots)} (sized by {reserve.shaped_by})" if reserve.shaped_by
             else "adapter slots sized by the first set loaded")
    host = f"host cache of sets up to {mib(reserve.host)}" + ("" if reserve.host_counted else " (host memory)")
    blocks_text = "" if blocks is None else f" ({blocks} blocks)"
    return f"memory: base weights {mib(reserve.base)}; {slots}; {host}; KV cache {mib(kv)}{blocks_text}"


def _first_servable_config(adapter_dir: Path, base_cfg):
    for folder in sorted(p for p in adapter_dir.iterdir() if p.is_dir())[:8]:
        try:
            adapter = AdapterSet.load(folder)
            adapter.validate_for(base_cfg, folder.name)
            return adapter.config, f"the shape of {folder.name}"
        except LDMoleError as exc:
            logger.warning("sizing the adapter slots: skipping %s (%s)", folder.name, exc)
    return None, None
