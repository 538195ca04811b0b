"""All loaded adapter sets of one base model, stacked once for compute.

For every decoder layer and projection group (q/k/v, o, gate/up, down) the experts of all sets are
concatenated along one "global expert" axis G, so that set s owns experts [offset_s, offset_s + E_s):

    A       [G, P, r_max, in]    P = projections in the group; smaller ranks are zero-padded
    router  [G, P, in]
    B[i]    [G, r_max, out_i]    one per projection (their widths differ under GQA); stored
                                 transposed, so a set's slice is one [E * r, out] matmul operand
                                 and a kernel's expand step is a contiguous axpy per rank
    threshold        [S, P, in], threshold_bias [S, P]: per set (not per expert), AdaMoLE's
                                 threshold layers; zeros for sets of other router kinds

Zero padding contributes exact zeros, so a set's slice computes the same numbers as its own
tensors. Stacking happens when a set is added or removed, never per forward, and a set's slice
`[offset:offset + E]` is a view that reshapes to one matmul operand without a copy.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ldmole_kernels.router_kinds import RouterKind
from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.adapters.spec import PROJECTION_GROUPS, AdapterConfig, lambda_key, projection_shapes, tensor_key
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.lora.kernel_tables import KernelTables, build_tables
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
    lambda_nets: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # in-width -> (w1, b1, w2, b2), fp32
    lambda_out_bias: dict[int, float] = field(default_factory=dict)  # in-width -> b2 as a Python float (for kernels)
    # group -> [P, 1] mask of the projections this set adapts (None: all of them);
    # groups it adapts nothing in are absent, and skipped
    group_masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # group -> indices of the projections this set adapts: only these make routing decisions (a
    # masked projection's p is all zero and must not count in expert statistics or routing losses)
    adapted: dict[str, tuple[int, ...]] = field(default_factory=dict)
    score: tuple[torch.Tensor, torch.Tensor | None] | None = None
    num_labels: int | None = None
    config: AdapterConfig | None = None
    router_options: dict = field(default_factory=dict)
    threshold_cap: float = 0.0  # router "threshold": AdaMoLE's τmax
    uid: int = field(default_factory=lambda: next(_slot_uids))  # unique per load, unlike the name or index
    # the set's place in the bank (the kernels' set index) while it is loaded; None once unloaded.
    # Requests hold their slot, so this is how they find their set after others are unloaded.
    index: int | None = None

    @property
    def router(self) -> Router:
        return ROUTERS[self.router_kind]

    @functools.cached_property
    def kernel_kind(self) -> RouterKind:
        """The router's number in the kernels (asked per projection group, so worked out once)."""
        return RouterKind.of(self.router_kind)


@dataclass
class GroupBank:
    layer: int
    group: str
    projections: tuple[str, ...]
    fan_in: int
    fan_outs: tuple[int, ...]
    A: torch.Tensor
    router: torch.Tensor
    B: list[torch.Tensor]
    threshold: torch.Tensor  # [S, P, in]
    threshold_bias: torch.Tensor  # [S, P]
    kernel_cache: tuple | None = field(default=None, repr=False)  # C-side view of B, see mixture._kernel_layout

    @property
    def column_slices(self) -> list[slice]:
        """Where each projection's output sits in the fused base output."""
        bounds, start = [], 0
        for width in self.fan_outs:
            bounds.append(slice(start, start + width))
            start += width
        return bounds


class AdapterBank:
    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.slots: list[SetSlot] = []
        self.rank_max = 0
        self._tables: KernelTables | None = None
        self.version = 0  # bumped whenever sets are added or removed: the stacked tensors are new
        shapes = projection_shapes(cfg)
        self.groups: dict[tuple[int, str], GroupBank] = {}
        for layer in range(cfg.num_layers):
            for group, projs in PROJECTION_GROUPS.items():
                fan_in = shapes[projs[0]][0]
                fan_outs = tuple(shapes[p][1] for p in projs)
                P = len(projs)
                self.groups[(layer, group)] = GroupBank(
                    layer, group, projs, fan_in, fan_outs,
                    A=self._empty(0, P, 0, fan_in), router=self._empty(0, P, fan_in),
                    B=[self._empty(0, 0, o) for o in fan_outs], threshold=self._empty(0, P, fan_in),
                    threshold_bias=self._empty(0, P))

    def _empty(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    # ---- lookup -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def index_of(self, name: str) -> int:
        return self.slot(name).index

    def slot(self, name: str) -> SetSlot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(name)

    def group(self, layer: int, group: str) -> GroupBank:
        return self.groups[(layer, group)]

    def kernel_tables(self) -> KernelTables:
        """Per-set device tables for the one-launch kernels; rebuilt after the sets change."""
        if self._tables is None:
            self._tables = build_tables(self)
        return self._tables

    def invalidate_kernel_tables(self) -> None:
        """The sets' tensors changed (training): tables copy λ, captured graphs hold old pointers."""
        self._tables = None
        self.version += 1

    @property
    def total_experts(self) -> int:
        return sum(s.num_experts for s in self.slots)

    # ---- adding and removing sets -------------------------------------------------------------
    def add(self, name: str, adapter: AdapterSet) -> int:
        if name in self.names:
            raise LDMoleError(f"an adapter set named {name!r} is already loaded")
        adapter.validate_for(self.cfg, name)
        c = adapter.config
        slot = SetSlot(name, c.num_experts, c.rank, c.scaling, c.router, offset=self.total_experts,
                       num_labels=c.num_labels, config=c, router_options={"k": c.top_k} if c.top_k else {},
                       threshold_cap=c.threshold_cap)
        t = {k: v.to(self.device) for k, v in adapter.tensors.items()}
        if slot.router.needs_lambda:
            slot.lambda_nets = {w: tuple(t[lambda_key(w, part)].float().contiguous()
                                         for part in ("0.weight", "0.bias", "2.weight", "2.bias"))
                                for w in c.lambda_widths}
            slot.lambda_out_bias = {w: float(net[3]) for w, net in slot.lambda_nets.items()}
        if "score.weight" in t:
            bias = t.get("score.bias")
            slot.score = (t["score.weight"].to(self.dtype), None if bias is None else bias.to(self.dtype))

        self._grow_rank(c.rank)
        for (layer, group), gb in self.groups.items():
            targeted = [p in c.target_modules for p in gb.projections]
            if any(targeted):
                slot.adapted[group] = tuple(i for i, hit in enumerate(targeted) if hit)
            if all(targeted):
                slot.group_masks[group] = None
            elif any(targeted):
                slot.group_masks[group] = torch.tensor(targeted, device=self.device, dtype=torch.float32)[:, None]
            A, R, Bs, T, Tb = self._stack_set(t, c, layer, gb, targeted)
            gb.A = torch.cat([gb.A, A])
            gb.router = torch.cat([gb.router, R])
            gb.B = [torch.cat([b_all, b]) for b_all, b in zip(gb.B, Bs, strict=True)]
            gb.threshold = torch.cat([gb.threshold, T[None]])
            gb.threshold_bias = torch.cat([gb.threshold_bias, Tb[None]])
        slot.index = len(self.slots)
        self.slots.append(slot)
        self._tables = None
        self.version += 1
        return slot.index

    def remove(self, name: str) -> None:
        index = self.index_of(name)
        slot = self.slots.pop(index)
        keep = torch.ones(slot.offset + slot.num_experts + sum(s.num_experts for s in self.slots[index:]),
                          dtype=torch.bool, device=self.device)
        keep[slot.offset:slot.offset + slot.num_experts] = False
        others = [i for i in range(len(self.slots) + 1) if i != index]
        for gb in self.groups.values():
            gb.A, gb.router = gb.A[keep].contiguous(), gb.router[keep].contiguous()
            gb.B = [b[keep].contiguous() for b in gb.B]
            gb.threshold, gb.threshold_bias = gb.threshold[others].contiguous(), gb.threshold_bias[others].contiguous()
        for later in self.slots[index:]:
            later.offset -= slot.num_experts
            later.index -= 1
        slot.index = None
        self._tables = None
        self.version += 1

    def export(self, name: str) -> AdapterSet:
        """The set's current weights in the native layout (after training, for saving)."""
        slot = self.slots[self.index_of(name)]
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
                    s = self.slots.index(slot)
                    tensors[key("threshold.weight")] = gb.threshold[s, i][None].detach().clone()
                    tensors[key("threshold.bias")] = gb.threshold_bias[s, i][None].detach().clone()
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

    def _grow_rank(self, rank: int) -> None:
        if rank <= self.rank_max:
            return
        pad = rank - self.rank_max
        for gb in self.groups.values():
            gb.A = F.pad(gb.A, (0, 0, 0, pad))
            gb.B = [F.pad(b, (0, 0, 0, pad)) for b in gb.B]
        self.rank_max = rank

    def _stack_set(self, t, c, layer: int, gb: GroupBank, targeted: list[bool]):
        E, r, P = c.num_experts, c.rank, len(gb.projections)
        A = self._empty(E, P, self.rank_max, gb.fan_in)
        R = self._empty(E, P, gb.fan_in)
        Bs = [self._empty(E, self.rank_max, o) for o in gb.fan_outs]
        T, Tb = self._empty(P, gb.fan_in), self._empty(P)
        for i, (proj, on) in enumerate(zip(gb.projections, targeted, strict=True)):
            if not on:
                continue
            key = functools.partial(tensor_key, layer, proj)
            A[:, i, :r] = t[key("lora_A")]
            Bs[i][:, :r] = t[key("lora_B")].transpose(1, 2)
            if key("router") in t:
                R[:, i] = t[key("router")]
            if key("threshold.weight") in t:
                T[i], Tb[i] = t[key("threshold.weight")][0], t[key("threshold.bias")][0]
        return A, R, Bs, T, Tb
