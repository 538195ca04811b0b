"""The adapter sets on the compute device: a slot bank, allocated once, one slot per set.

For every decoder layer and projection group (q/k/v, o, gate/up, down) that some slot adapts, the
experts of all slots lie along one "global expert" axis G = slots x experts per slot, so that the
set in slot s owns experts [offset_s, offset_s + E_s) with offset_s = s x experts per slot:

    A       [G, P, r, in]    P = the group's projections that slots adapt (bank_layout.py);
                             a set of smaller rank leaves rows zero
    router  [G, P, in]
    B[i]    [G, r, out_i]    one per projection (their widths differ under GQA); stored
                             transposed, so a set's slice is one [E * r, out] matmul operand
                             and a kernel's expand step is a contiguous axpy per rank
    threshold        [S, P, in], threshold_bias [S, P]: per slot, AdaMoLE's threshold layers
                             (allocated only once an AdaMoLE set is loaded)
    λ-networks       per input width: [S, H, in], [S, H], [S, H], [S] (fp32), shared with the kernels

Loading a set writes its own slot and table rows; unloading frees them. Neither touches another
set, so a load costs what the set weighs, however many sets the bank holds, and CUDA graphs keep
their pointers. Zero padding contributes exact zeros, so a set's slice computes the same numbers
as its own tensors, and `[offset:offset + E]` reshapes to one matmul operand without a copy.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace

import torch

from ldmole_kernels.router_kinds import RouterKind
from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.adapters.spec import PROJECTION_GROUPS, AdapterConfig, lambda_key, projection_shapes, tensor_key
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.lora.bank_layout import BankGeometry
from ldmole_runtime.lora.kernel_tables import KernelTables
from ldmole_runtime.lora.routing import ROUTERS, Router
from ldmole_runtime.model.config import ModelConfig

_slot_uids = itertools.count()


@dataclass
class SetSlot:
    """One adapter set's place in the bank and its small, unstacked parts."""
    name: str
    num_experts: int
    rank: int
    scaling: float  # alpha / r
    router_kind: str
    offset: int = 0
    # in-width -> (w1 [h, in], b1 [h], w2 [1, h], b2 [1]) fp32: views of the bank's λ rows (training: parameters)
    lambda_nets: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)
    lambda_out_bias: dict[int, float] = field(default_factory=dict)  # in-width -> b2 as a Python float (for kernels)
    # copies the CPU kernel's callers make once per load (lora/ops/cpu.py): in-width -> the λ-network's
    # first layer in bf16 (a bf16 engine's long segments); ("router", id(GroupBank)) -> its router rows in fp32
    kernel_copies: dict = field(default_factory=dict, repr=False)
    # group -> [P, 1] mask of the projections this set adapts (None: all of them);
    # groups it adapts nothing in are absent, and skipped
    group_masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # group -> indices of the projections this set adapts: only these make routing decisions (a
    # masked projection's p is all zero and must not count in expert statistics or routing losses)
    adapted: dict[str, tuple[int, ...]] = field(default_factory=dict)
    score: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)
    num_labels: int | None = None
    config: AdapterConfig | None = field(default=None, repr=False)
    router_options: dict = field(default_factory=dict)
    threshold_cap: float = 0.0  # router "threshold": AdaMoLE's τmax
    uid: int = field(default_factory=lambda: next(_slot_uids))  # unique per load, unlike the name or index
    # the set's slot in the bank (the kernels' set index) while it is loaded; None once unloaded
    index: int | None = None

    @property
    def router(self) -> Router:
        return ROUTERS[self.router_kind]

    @functools.cached_property
    def kernel_kind(self) -> RouterKind:
        """The router's number in the kernels (asked per projection group, so worked out once)."""
        return RouterKind.of(self.router_kind)


class NoFreeSlotError(LDMoleError):
    """Every slot of a bank of fixed size holds a set: one must be unloaded (evicted) first."""


@dataclass
class GroupBank:
    layer: int
    group: str
    projections: tuple[str, ...]  # the group's projections that slots adapt
    fan_in: int
    fan_outs: tuple[int, ...]
    columns: tuple[int, ...]  # where each projection's output starts in the group's fused base output
    A: torch.Tensor
    router: torch.Tensor
    B: list[torch.Tensor]
    threshold: torch.Tensor  # [S, P, in]
    threshold_bias: torch.Tensor  # [S, P]
    kernel_cache: tuple | None = field(default=None, repr=False)  # C-side view of B, see ops/cpu._kernel_layout
    units_cache: tuple | None = field(default=None, repr=False)  # the C GroupTables, see ops/cpu._group_tables

    @property
    def column_slices(self) -> list[slice]:
        """Where each projection's output sits in the fused base output."""
        return [slice(c, c + w) for c, w in zip(self.columns, self.fan_outs, strict=True)]


class AdapterBank:
    """`max_sets`: a fixed number of slots (the server's `--max-loras`); None grows the bank as sets
    arrive (doubling, so a library user loading n sets lays it out O(log n) times)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sets: int | None = None):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        if max_sets is not None and max_sets < 1:
            raise LDMoleError(f"an adapter bank needs at least one slot, got max_sets={max_sets}")
        self.max_sets = max_sets
        self.geometry = BankGeometry(capacity=max_sets or 0)
        self._by_index: list[SetSlot | None] = []
        self._by_name: dict[str, SetSlot] = {}
        self.groups: dict[tuple[int, str], GroupBank] = {}
        self.lambdas: dict[int, tuple[torch.Tensor, ...]] = {}
        self._tables = KernelTables.allocate(0, 0, {}, {}, 0, self.device)
        self.layouts = 0  # times the stored sets were copied into new storage (a geometry change)
        self.version = 0  # bumped with every new storage: captured graphs then hold stale pointers

    # ---- lookup -------------------------------------------------------------------------------
    @property
    def slots(self) -> list[SetSlot]:
        """The loaded sets, by slot index."""
        return [s for s in self._by_index if s is not None]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    @property
    def capacity(self) -> int:
        """Slots: the kernels' set indices lie in [0, capacity)."""
        return len(self._by_index)

    @property
    def full(self) -> bool:
        """Every slot of a bank of fixed size holds a set (a growable bank is never full)."""
        return self.max_sets is not None and all(s is not None for s in self._by_index) \
            and self.capacity >= self.max_sets

    def names_by_index(self) -> list[str | None]:
        """Each slot's set name (None: a free slot), indexed like the kernels' set indices."""
        return [None if s is None else s.name for s in self._by_index]

    def limit(self, max_sets: int) -> None:
        """Fix the number of slots (`--max-loras`), laying the bank out again if it holds sets."""
        if max_sets < 1 or len(self.slots) > max_sets:
            raise LDMoleError(f"max_loras must be >= 1 and hold the {len(self.slots)} sets already loaded; "
                              f"got {max_sets}")
        self.max_sets = max_sets
        if self.capacity:
            self._lay_out(replace(self.geometry, capacity=max_sets))
        else:
            self.geometry = replace(self.geometry, capacity=max_sets)

    def at(self, index: int) -> SetSlot:
        """The set in slot `index` (a kernel set index of a step)."""
        return self._by_index[index]

    def index_of(self, name: str) -> int:
        return self.slot(name).index

    def slot(self, name: str) -> SetSlot:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(name) from None

    def group(self, layer: int, group: str) -> GroupBank:
        return self.groups[(layer, group)]

    def kernel_tables(self) -> KernelTables:
        """Per-slot device tables for the one-launch kernels (kept up to date by every load and unload)."""
        return self._tables

    def invalidate_kernel_tables(self) -> None:
        """Training changed the sets' tensors: copy trained λ-networks into the rows the kernels read."""
        for slot in self.slots:
            slot.kernel_copies = {}
            for w, net in slot.lambda_nets.items():
                rows = self._lambda_rows(slot.index, w, net[0].shape[0])
                for dst, src in zip(rows, net, strict=True):
                    if dst.data_ptr() != src.data_ptr():
                        dst.copy_(src.detach().reshape(dst.shape))
        self.version += 1

    # ---- adding and removing sets -------------------------------------------------------------
    def add(self, name: str, adapter: AdapterSet) -> int:
        """Write the set into a free slot; returns the slot index. Raises NoFreeSlotError when a bank
        of fixed size is full."""
        if name in self._by_name:
            raise LDMoleError(f"an adapter set named {name!r} is already loaded")
        adapter.validate_for(self.cfg, name)
        c = adapter.config
        free = next((i for i, s in enumerate(self._by_index) if s is None), None)
        if free is None and self.max_sets is not None and self.capacity >= self.max_sets:
            raise NoFreeSlotError(f"all {self.max_sets} adapter slots are in use (--max-loras); unload a set first")
        geometry = self.geometry
        if not geometry.fits(c):
            geometry = geometry.grown_for(c)
        if free is None:
            geometry = replace(geometry, capacity=self.max_sets or max(4, 2 * self.capacity))
        if geometry != self.geometry:
            self._lay_out(geometry)
            free = next(i for i, s in enumerate(self._by_index) if s is None)
        slot = SetSlot(name, c.num_experts, c.rank, c.scaling, c.router, num_labels=c.num_labels, config=c,
                       router_options={"k": c.top_k} if c.top_k else {}, threshold_cap=c.threshold_cap)
        self._place(slot, free, adapter.tensors)
        return free

    def remove(self, name: str) -> None:
        slot = self._by_name.pop(name)
        self._by_index[slot.index] = None
        self._tables.clear(slot.index)
        slot.index, slot.lambda_nets, slot.lambda_out_bias, slot.kernel_copies = None, {}, {}, {}

    def storage_bytes(self) -> int:
        """Every byte the bank holds on the device: all slots, used or not, and their tables."""
        t = self._tables
        parts = [t.set_info, t.scaling, t.threshold_cap, *t.masks.values()]
        parts += [x for gb in self.groups.values() for x in (gb.A, gb.router, *gb.B, gb.threshold, gb.threshold_bias)]
        parts += [x for net in self.lambdas.values() for x in net]
        return sum(x.numel() * x.element_size() for x in parts)

    def storage_bytes_at(self, capacity: int, config: AdapterConfig | None = None,
                         dtype: torch.dtype | None = None) -> int:
        """What `storage_bytes` would be with `capacity` slots of this bank's shape grown for `config`:
        measured on storage laid out on the meta device, so that it is the allocation's own arithmetic."""
        geometry = self.geometry if config is None else self.geometry.grown_for(config)
        probe = AdapterBank(self.cfg, "meta", dtype or self.dtype)
        probe._lay_out(replace(geometry, capacity=capacity))
        return probe.storage_bytes()

    def resident_bytes(self, name: str) -> int:
        """The bank bytes the set's slot occupies: its expert units in every group, its table and λ
        rows, its score head."""
        slot = self.slot(name)
        s, G = slot.index, self.geometry
        units = slice(s * G.experts, (s + 1) * G.experts)
        parts = [self._tables.set_info[s], self._tables.scaling[s], self._tables.threshold_cap[s]]
        parts += [m[s] for m in self._tables.masks.values()]
        for gb in self.groups.values():
            parts += [gb.A[units], *(b[units] for b in gb.B)]
            parts += [gb.router[units]] if G.router else []
            parts += [gb.threshold[s], gb.threshold_bias[s]] if G.threshold else []
        parts += [t[s] for net in self.lambdas.values() for t in net]
        parts += [t for t in (slot.score or ()) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    def export(self, name: str) -> AdapterSet:
        """The set's current weights in the native layout (after training, for saving)."""
        slot = self.slot(name)
        c = slot.config
        E, r, lo = slot.num_experts, slot.rank, slot.offset
        tensors: dict[str, torch.Tensor] = {}
        for (layer, _), gb in self.groups.items():
            for i, proj in enumerate(gb.projections):
                if proj not in c.target_modules:
                    continue
                key = functools.partial(tensor_key, layer, proj)
                tensors[key("lora_A")] = gb.A[lo:lo + E, i, :r].detach().clone()
                tensors[key("lora_B")] = gb.B[i][lo:lo + E, :r].transpose(1, 2).detach().clone()
                if slot.router.needs_logits:
                    tensors[key("router")] = gb.router[lo:lo + E, i].detach().clone()
                if slot.router.needs_threshold:
                    tensors[key("threshold.weight")] = gb.threshold[slot.index, i][None].detach().clone()
                    tensors[key("threshold.bias")] = gb.threshold_bias[slot.index, i][None].detach().clone()
        for w, net in slot.lambda_nets.items():
            for part, t in zip(("0.weight", "0.bias", "2.weight", "2.bias"), net, strict=True):
                tensors[lambda_key(w, part)] = t.detach().clone()
        if slot.score is not None:
            tensors["score.weight"] = slot.score[0].detach().clone()
            if slot.score[1] is not None:
                tensors["score.bias"] = slot.score[1].detach().clone()
        adapter = AdapterSet(c, {k: v.float().cpu().contiguous() for k, v in tensors.items()})
        adapter.check_tensors(f"adapter set {name!r}")
        return adapter

    # ---- storage ------------------------------------------------------------------------------
    def _lay_out(self, geometry: BankGeometry) -> None:
        """New storage for `geometry`; the stored sets are copied over, into slots 0, 1, ... (between
        steps: a request finds its set's slot index anew every step)."""
        kept = [(slot, self.export(slot.name)) for slot in self.slots]
        self.geometry, G = geometry, geometry
        S, U = G.capacity, G.capacity * G.experts
        shapes = projection_shapes(self.cfg)
        self.groups = {}
        for layer in range(self.cfg.num_layers):
            for group, every in PROJECTION_GROUPS.items():
                projs = G.group_projections(group)
                if not projs:
                    continue
                starts = dict(zip(every, [0, *itertools.accumulate(shapes[p][1] for p in every)], strict=False))
                fan_in, P = shapes[projs[0]][0], len(projs)
                fan_outs = tuple(shapes[p][1] for p in projs)
                self.groups[(layer, group)] = GroupBank(
                    layer, group, projs, fan_in, fan_outs, tuple(starts[p] for p in projs),
                    A=self._zeros(U, P, G.rank, fan_in), router=self._zeros(U if G.router else 1, P, fan_in),
                    B=[self._zeros(U, G.rank, o) for o in fan_outs],
                    threshold=self._zeros(S if G.threshold else 1, P, fan_in),
                    threshold_bias=self._zeros(S if G.threshold else 1, P))
        H = G.lambda_hidden
        self.lambdas = {w: tuple(torch.zeros(shape, device=self.device) for shape in ((S, H, w), (S, H), (S, H), (S,)))
                        for w in sorted(G.lambda_widths)}
        sizes = {g: len(G.group_projections(g)) for g in PROJECTION_GROUPS if G.group_projections(g)}
        self._tables = KernelTables.allocate(S, G.experts, sizes, self.lambdas, H, self.device)
        self._by_index = [None] * S
        self._by_name = {}
        for index, (slot, adapter) in enumerate(kept):
            self._place(slot, index, adapter.tensors)
        self.layouts += 1
        self.version += 1

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    def _lambda_rows(self, s: int, width: int, h: int) -> tuple[torch.Tensor, ...]:
        w1, b1, w2, b2 = self.lambdas[width]
        return w1[s, :h], b1[s, :h], w2[s:s + 1, :h], b2[s:s + 1]

    def _place(self, slot: SetSlot, s: int, t: dict[str, torch.Tensor]) -> None:
        """Write a set's tensors into slot s (and only there), then its table rows."""
        c, G = slot.config, self.geometry
        E, r = c.num_experts, c.rank
        slot.index, slot.offset = s, s * G.experts
        lo, units = slot.offset, slice(slot.offset, slot.offset + G.experts)
        slot.adapted, slot.group_masks = {}, {}
        for group in PROJECTION_GROUPS:
            projs = G.group_projections(group)
            targeted = [p in c.target_modules for p in projs]
            if any(targeted):
                slot.adapted[group] = tuple(i for i, hit in enumerate(targeted) if hit)
                slot.group_masks[group] = None if all(targeted) else torch.tensor(
                    targeted, device=self.device, dtype=torch.float32)[:, None]
        for (layer, _), gb in self.groups.items():
            gb.A[units] = 0.0  # a freed slot keeps its last set's numbers: clear what this one leaves unused
            for b in gb.B:
                b[units] = 0.0
            if G.router:
                gb.router[units] = 0.0
            if G.threshold:
                gb.threshold[s], gb.threshold_bias[s] = 0.0, 0.0
            for i, proj in enumerate(gb.projections):
                if proj not in c.target_modules:
                    continue
                key = functools.partial(tensor_key, layer, proj)
                gb.A[lo:lo + E, i, :r] = t[key("lora_A")]
                gb.B[i][lo:lo + E, :r] = t[key("lora_B")].transpose(1, 2)
                if key("router") in t:
                    gb.router[lo:lo + E, i] = t[key("router")]
                if key("threshold.weight") in t:
                    gb.threshold[s, i] = t[key("threshold.weight")][0]
                    gb.threshold_bias[s, i] = t[key("threshold.bias")][0]
        slot.lambda_nets, slot.lambda_out_bias, slot.kernel_copies = {}, {}, {}
        for w in self.lambdas:
            for row in self._lambda_rows(s, w, G.lambda_hidden):
                row.zero_()
        if slot.router.needs_lambda:
            for w in c.lambda_widths:
                rows = self._lambda_rows(s, w, c.lambda_hidden)
                for row, part in zip(rows, ("0.weight", "0.bias", "2.weight", "2.bias"), strict=True):
                    row.copy_(t[lambda_key(w, part)].reshape(row.shape))
                slot.lambda_nets[w] = rows
                slot.lambda_out_bias[w] = float(rows[3])
        if "score.weight" in t:
            bias = t.get("score.bias")
            slot.score = (t["score.weight"].to(self.device, self.dtype),
                          None if bias is None else bias.to(self.device, self.dtype))
        self._by_index[s] = slot
        self._by_name[slot.name] = slot
        self._tables.write(slot)
