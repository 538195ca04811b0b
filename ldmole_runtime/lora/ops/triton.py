"""The Triton backend: three launches per projection group, whatever the mix of sets in the step.

routing (λ, router logits, the router, p) → shrink (active experts only) → expand into y; see
kernels/triton/. Every launch walks the step's block table (`AdapterBatch.blocks`), so tokens of
different sets and bare-base tokens share it and nothing depends on the host knowing who routed
where: no device→host sync, and a CUDA graph can replay the step with new metadata.
"""

from __future__ import annotations

import os

import torch

from ldmole_kernels.triton.routing import RoutingPlan, route_logits
from ldmole_kernels.triton.shrink_expand import shrink_expand
from ldmole_runtime.lora.adapter_batch import TOKEN_BLOCK, AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank, GroupBank
from ldmole_runtime.lora.ops import torch_ref
from ldmole_runtime.lora.routing import SPARSEGEN_EPS

_REFERENCE = torch_ref.TorchRefBackend()
# Under Triton's interpreter (CPU tests) nothing is compiled, so a warm-up would only spend CPU time; the
# test that checks what a GPU would compile turns it on.
WARM_UP_INTERPRETED = False


class TritonBackend:
    name = "triton"

    @torch.inference_mode()
    def warm_up(self, bank: AdapterBank) -> None:
        """Launch every kernel variant the bank's steps can need, once: a step of one token of each set
        (and a bare-base token) through each group shape, with and without a routing sink. Triton
        specialises on dtypes, constexprs (P, the bank's widest E, the λ-network's presence) and
        alignment, all of which this step shares with every real one."""
        from ldmole_runtime.lora.capture import RoutingCapture

        if not bank.slots or (os.environ.get("TRITON_INTERPRET") == "1" and not WARM_UP_INTERPRETED):
            return
        ids = torch.tensor([-1] + [s.index for s in bank.slots])
        n = ids.shape[0]
        batch = AdapterBatch.build(ids, bank.capacity)
        shapes = {}
        for (_, group), gb in bank.groups.items():
            shapes.setdefault((group, gb.fan_in, gb.fan_outs), gb)
        for gb in shapes.values():
            x = torch.zeros(n, gb.fan_in, dtype=bank.dtype, device=bank.device)
            for sink in (None, RoutingCapture(n, bank.kernel_tables().max_experts)):
                y = torch.zeros(n, sum(gb.fan_outs), dtype=bank.dtype, device=bank.device)
                self.apply(y, x, bank, gb, batch, sink)

    def apply(self, y: torch.Tensor, x: torch.Tensor, bank: AdapterBank, gb: GroupBank, batch: AdapterBatch,
              capture=None, dropout: float = 0.0) -> None:
        if dropout > 0.0 or torch.is_grad_enabled():  # training: the differentiable reference
            _REFERENCE.apply(y, x, bank, gb, batch, capture, dropout)
            return
        tables = bank.kernel_tables()
        x = x.contiguous()
        P = len(gb.projections)
        # what the router's scalar was per token and projection: λ (the same for every projection) or AdaMoLE's t
        scalars = torch.full((x.shape[0], P), float("nan"), device=x.device) if capture is not None else None
        # work buffers sized for the widest group (3 projections) and the bank's rank: one each per step
        N, R, EMAX = x.shape[0], gb.A.shape[2], tables.max_experts
        lambdas, masks = tables.lambdas.get(gb.fan_in), tables.masks[gb.group]
        plan = RoutingPlan(P, EMAX, lambdas)
        widest = RoutingPlan(3, EMAX, None, hidden=tables.lambda_hidden)  # the step's buffer fits every group
        # launch 1: the routing GEMMs; 2: the routing epilogue, then shrink; 3: expand
        work = route_logits(x, batch.sorted_tokens, batch.blocks, tables.set_info, masks, gb.router, lambdas,
                            gb.threshold, plan, TOKEN_BLOCK, batch.scratch_buffer("route", N * widest.WORK, x.device))
        p = batch.scratch_buffer("p", N * 3 * EMAX, x.device)[:N * P * EMAX].view(N, P, EMAX)
        b2 = lambdas[3] if lambdas is not None else p
        shrink_expand(y, x, p, batch.sorted_tokens, batch.blocks, tables.set_info, tables.scaling, gb.A, gb.B,
                      TOKEN_BLOCK, cols=gb.columns, h_out=batch.scratch_buffer("h", N * 3 * EMAX * R, x.device),
                      routing=(work, masks, b2, gb.threshold_bias, tables.threshold_cap, SPARSEGEN_EPS, plan,
                               scalars))
        if capture is not None:
            for seg in batch.segments:
                slot = bank.at(seg.set_index)
                if gb.group in slot.group_masks:
                    rows = slice(None) if seg.index is None else seg.index
                    scalar = scalars[rows, 0] if slot.router.needs_lambda else scalars[rows]
                    torch_ref.record(capture, slot, gb, seg.index, p[rows, :, :slot.num_experts], scalar)
