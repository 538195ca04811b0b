"""Where each servable adapter set is: in a device slot (the bank), in host memory, or on disk.

vLLM's tiers: at most `max_loras` sets on the compute device (so at most that many distinct sets
in a step), up to `max_cpu_loras` more in host memory, ready to copy in, and any number on disk
(the sets loaded by path, and every folder of `adapter_dir`). Least recently used sets leave a
tier first; a set is never evicted while it has admitted requests (no thrashing), nor when pinned.

A request whose set is not on the device waits here (`pending`), outside the scheduler. Its set is
read and checked on a worker thread; only the copy into a slot happens on the engine thread,
between steps (`place`). When every slot is busy, the least recently used unpinned set stops
taking new requests (it drains) and gives up its slot as soon as its admitted requests finish, so
a waiting set gets a slot within the lifetime of the requests already running (no starvation).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import itertools
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.errors import EngineOverloadedError, LDMoleError, UnknownAdapterError
from ldmole_runtime.lora.bank import SetSlot

logger = logging.getLogger("ldmole.adapters")
_uids = itertools.count()
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Counts per `le` bucket (the last one +Inf), a sum and a count: what Prometheus exports."""
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value


@dataclass(eq=False)
class AdapterHandle:
    """One servable set, whatever its tier: requests hold this, and find its slot when they run."""
    name: str
    source: Path | AdapterSet | None  # where to read it again (None: only ever in the bank)
    pinned: bool = False
    # the set's identity in prefix-cache hashes: the same across evictions (the same weights come back)
    uid: int = field(default_factory=lambda: next(_uids))
    slot: SetSlot | None = None  # its bank slot while on the device
    removed: bool = False
    draining: bool = False  # on the device but taking no new requests: its slot is wanted by a waiting set
    last_used: int = 0  # the cache's clock at its last admitted request: the LRU order
    waiting_since: float | None = None  # when its first pending request arrived


class AdapterCache:
    def __init__(self, runtime, max_cpu_loras: int = 0, adapter_dir: str | Path | None = None,
                 pinned: tuple[str, ...] = ()):
        self.runtime, self.bank = runtime, runtime.bank
        self.max_cpu_loras = max_cpu_loras
        self.adapter_dir = None if adapter_dir is None else Path(adapter_dir)
        self.handles: dict[str, AdapterHandle] = {}
        self.host: OrderedDict[str, AdapterSet] = OrderedDict()  # LRU: least recently used first
        self.pending: dict[AdapterHandle, list] = {}  # handle -> requests waiting for its slot, in arrival order
        self._reads: dict[str, concurrent.futures.Future] = {}
        # sets read for waiting requests, not yet in a slot: held whatever the host cache's size (as many
        # as there are sets with waiting requests, which the queue limit bounds)
        self._staged: dict[str, AdapterSet] = {}
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ldmole-adapter-read")
        self.clock = 0  # bumped per admission: the LRU order
        self.loads = {"disk": 0, "host": 0}
        self.evictions = 0
        self.hits = self.misses = 0  # requests whose set was in a slot when they arrived, and the others
        self.load_seconds = Histogram(LOAD_BUCKETS)
        self.wait_seconds = Histogram(WAIT_BUCKETS)
        for slot in self.bank.slots:  # the sets the engine starts with: pinned, read by path never again
            self.handles[slot.name] = AdapterHandle(slot.name, None, pinned=True, slot=slot)
        if max_cpu_loras < 0:
            raise LDMoleError(f"max_cpu_loras must be >= 0, got {max_cpu_loras}")
        for name in pinned:
            self.resolve(name).pinned = True
        if self.adapter_dir is not None:
            if not self.adapter_dir.is_dir():
                raise LDMoleError(f"--adapter-dir {self.adapter_dir}: not a folder")
            for folder in sorted(self.adapter_dir.iterdir()):  # names only: nothing is read until asked for
                if folder.is_dir() and _FOLDER_NAME.fullmatch(folder.name) and folder.name not in self.handles:
                    self.handles[folder.name] = AdapterHandle(folder.name, folder)

    # ---- names ------------------------------------------------------------------------------------
    def resolve(self, name: str) -> AdapterHandle:
        handle = self.handles.get(name)
        if handle is not None and handle.slot is not None and handle.slot.index is None:
            # unloaded from the runtime itself, behind the engine's back
            handle.removed = True
            del self.handles[name]
            handle = None
        if handle is None and name in self.bank.names:
            # loaded into the runtime itself (through LLM.runtime, or a runtime two engines share)
            handle = AdapterHandle(name, None, pinned=True, slot=self.bank.slot(name))
            self.handles[name] = handle
        if handle is None and self.adapter_dir is not None and _FOLDER_NAME.fullmatch(name):
            folder = self.adapter_dir / name  # a folder added since start-up
            if folder.is_dir():
                handle = self.handles[name] = AdapterHandle(name, folder)
        if handle is None:
            known = sorted(self.handles)
            shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
            raise UnknownAdapterError(f"unknown adapter set {name!r}; servable: [{shown}]")
        return handle

    def tier(self, handle: AdapterHandle) -> str:
        if handle.slot is not None:
            return "device"
        return "host" if handle.name in self.host or isinstance(handle.source, AdapterSet) else "disk"

    # ---- loading and unloading by name (the admin API) -------------------------------------------
    def add(self, name: str, adapter: AdapterSet, source: Path | None = None) -> AdapterHandle:
        """A new servable set, already read: into a free slot if there is one, else kept in host memory
        until a request asks for it."""
        if name in self.handles:
            raise LDMoleError(f"an adapter set named {name!r} is already loaded")
        adapter.validate_for(self.runtime.cfg, name)
        handle = AdapterHandle(name, source if source is not None else adapter)
        self.handles[name] = handle
        if not self.bank.full:
            self._copy_in(handle, adapter, "host")
        elif source is not None:
            self._host_put(name, adapter)
        return handle

    def remove(self, name: str) -> AdapterHandle:
        """Forget a set (its requests must have been aborted by the caller)."""
        handle = self.resolve(name)
        handle.removed = True
        del self.handles[name]
        self.host.pop(name, None)
        self._staged.pop(name, None)
        read = self._reads.pop(name, None)
        if read is not None:
            read.cancel()
        handle.draining = False
        if handle.slot is not None:
            self.bank.remove(name)
            handle.slot = None
        return handle

    # ---- requests -----------------------------------------------------------------------------------
    def wait(self, handle: AdapterHandle, request) -> None:
        if handle not in self.pending:
            handle.waiting_since = time.monotonic()
            self.pending[handle] = []
        self.pending[handle].append(request)
        self._start_read(handle)

    def touch(self, handle: AdapterHandle) -> None:
        self.clock += 1
        handle.last_used = self.clock

    def place(self, busy: set[AdapterHandle]) -> tuple[list, list]:
        """Between steps: copy waiting sets into slots, evicting idle ones (`busy`: the sets with admitted
        requests). Returns (requests now ready for the scheduler, [(request, error)] of sets that could
        not be read)."""
        ready, failed, busy = [], [], set(busy)
        for handle in list(self.pending):
            requests = self.pending[handle]
            if not requests:  # every request for it was aborted while it waited
                del self.pending[handle]
                self._staged.pop(handle.name, None)
                continue
            if handle.removed:
                del self.pending[handle]
                failed += [(r, UnknownAdapterError(f"adapter set {handle.name!r} was unloaded")) for r in requests]
                continue
            if handle.slot is None:
                try:
                    adapter, tier = self._host_copy(handle)
                    if adapter is None or not self._free_a_slot(busy):
                        continue  # still reading, or every slot busy (one is draining now)
                    self._copy_in(handle, adapter, tier)
                except LDMoleError as exc:  # a corrupt or mismatched folder (or only pinned slots): these fail
                    del self.pending[handle]
                    failed += [(r, exc) for r in requests]
                    continue
            elif handle.draining:
                continue
            del self.pending[handle]
            self.wait_seconds.observe(time.monotonic() - handle.waiting_since)
            ready += requests
            busy.add(handle)  # its requests are admitted now: no later set of this round may evict it
        return ready, failed

    def wait_for_reads(self, timeout: float) -> None:
        """Block until a pending read finishes (or timeout): an engine with nothing else to run waits here."""
        reads = [f for f in self._reads.values() if not f.done()]
        if reads:
            concurrent.futures.wait(reads, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def ensure_resident(self, handle: AdapterHandle, busy: set[AdapterHandle]) -> SetSlot:
        """The set on the device now, reading it on this thread if it must (classification)."""
        if handle.slot is None:
            self._start_read(handle)
            if handle.name in self._reads:
                concurrent.futures.wait([self._reads[handle.name]])
            adapter, tier = self._host_copy(handle)
            if not self._free_a_slot(busy):
                raise EngineOverloadedError("every adapter slot is busy (--max-loras); retry later")
            self._copy_in(handle, adapter, tier)
        return handle.slot

    # ---- tiers ------------------------------------------------------------------------------------
    def _free_a_slot(self, busy: set[AdapterHandle]) -> bool:
        """True when a slot is free (evicting the least recently used idle set if it must); False while
        the slots are busy (the least recently used set drains for the waiting ones)."""
        if not self.bank.full:
            return True
        resident = [h for h in (self.handles.get(s.name) for s in self.bank.slots) if h is not None and not h.pinned]
        if not resident:
            raise EngineOverloadedError(f"every adapter slot ({self.bank.capacity}, --max-loras) holds a pinned set: "
                                        "no other set can be served; raise --max-loras or pin fewer sets")
        idle = [h for h in resident if h not in busy]
        if idle:
            self._evict(min(idle, key=lambda h: h.last_used))
            return True
        if not any(h.draining for h in resident):
            if resident:
                min(resident, key=lambda h: h.last_used).draining = True
        return False

    def _evict(self, handle: AdapterHandle) -> None:
        self.bank.remove(handle.name)
        handle.slot = None
        handle.draining = False
        self.evictions += 1

    def _copy_in(self, handle: AdapterHandle, adapter: AdapterSet, source: str) -> None:
        start, layouts = time.perf_counter(), self.bank.layouts
        self.bank.add(handle.name, adapter)
        if layouts and self.bank.layouts != layouts and self.bank.max_sets is not None:
            logger.warning("adapter set %r does not fit the slots' shape: they were laid out again, larger; the "
                           "bank now holds %.1f MiB", handle.name, self.bank.storage_bytes() / 2**20)
        handle.slot = self.bank.slot(handle.name)
        self._staged.pop(handle.name, None)
        self.loads[source] += 1
        self.load_seconds.observe(time.perf_counter() - start)
        self.touch(handle)

    def _host_put(self, name: str, adapter: AdapterSet) -> None:
        if self.max_cpu_loras <= 0:
            return
        self.host[name] = adapter
        self.host.move_to_end(name)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def _host_copy(self, handle: AdapterHandle) -> tuple[AdapterSet | None, str]:
        """The set's tensors in host memory and the tier they came from, or None while its read runs;
        raises what the read raised (the next request reads the folder again)."""
        if isinstance(handle.source, AdapterSet):
            return handle.source, "host"
        if handle.name in self._staged:
            return self._staged[handle.name], "disk"
        if handle.name in self.host:
            self.host.move_to_end(handle.name)
            return self.host[handle.name], "host"
        read = self._reads.get(handle.name)
        if read is None or not read.done():
            self._start_read(handle)
            return None, "disk"
        del self._reads[handle.name]
        adapter = self._staged[handle.name] = read.result()
        self._host_put(handle.name, adapter)
        return adapter, "disk"

    def _start_read(self, handle: AdapterHandle) -> None:
        """Read a waiting set, unless enough are read ahead already: a slot takes one set at a time, so
        reading further ahead than the slots would only hold memory (1,000 waiting sets: gigabytes)."""
        read_ahead = max(self.bank.max_sets or 0, 1)
        if len(self._staged) + len(self._reads) >= read_ahead:
            return  # place() asks again, step by step, as slots take the sets read before
        if (handle.slot is None and handle.name not in self.host and handle.name not in self._reads
                and isinstance(handle.source, Path)):
            self._reads[handle.name] = self._reader.submit(self._read, handle.name, handle.source)

    def _read(self, name: str, path: Path) -> AdapterSet:
        try:
            adapter = AdapterSet.load(path)
            adapter.validate_for(self.runtime.cfg, name)
        except LDMoleError as exc:  # the client sees this: name the folder, not where the server keeps it
            raise type(exc)(str(exc).replace(f"{path.parent}{os.sep}", "")) from None
        if self.bank.device.type == "cuda":  # pinned: the copy into a slot is an asynchronous DMA
            adapter = AdapterSet(adapter.config, {k: v.pin_memory() for k, v in adapter.tensors.items()})
        return adapter

    def counts(self) -> dict[str, int]:
        """Sets per tier (device: in a slot; host: read, not in a slot)."""
        device = sum(h.slot is not None for h in self.handles.values())
        host = sum(1 for n in self.host if self.handles.get(n) is not None and self.handles[n].slot is None)
        return {"device": device, "host": host}

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

