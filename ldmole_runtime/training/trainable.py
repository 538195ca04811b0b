"""Make one adapter set of a runtime trainable, in place.

Training runs the very forward that serves (the dense mixture path, with autograd): the bank's
stacked tensors become the parameters, so what is trained is exactly what is served, and
`export()` reads them back in the native adapter layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.runtime import LDMoleRuntime


class TrainableAdapter(nn.Module):
    def __init__(self, runtime: LDMoleRuntime, name: str):
        super().__init__()
        bank = runtime.bank
        if bank.names != [name]:
            raise LDMoleError(
                f"training needs a runtime holding only the adapter set being trained, found {bank.names}"
            )
        self.runtime, self.name = runtime, name
        runtime.model.requires_grad_(False)
        slot = bank.slots[0]
        self.lora = nn.ParameterList()
        self.lambda_net = nn.ParameterList()
        for gb in bank.groups.values():
            gb.A = self._param(self.lora, gb.A)
            gb.router = self._param(self.lora, gb.router) if slot.router.needs_logits else gb.router
            gb.B = [self._param(self.lora, b) for b in gb.B]
            if slot.router.needs_threshold:
                gb.threshold = self._param(self.lora, gb.threshold)
                gb.threshold_bias = self._param(self.lora, gb.threshold_bias)
        slot.lambda_nets = {
            w: tuple(self._param(self.lambda_net, t) for t in net) for w, net in slot.lambda_nets.items()
        }
        if slot.score is not None:
            weight, bias = slot.score
            slot.score = (self._param(self.lora, weight), None if bias is None else self._param(self.lora, bias))
        self.slot = slot
        bank.invalidate_kernel_tables()

    @staticmethod
    def _param(params: nn.ParameterList, t: torch.Tensor) -> nn.Parameter:
        p = nn.Parameter(t.detach().float().clone())
        params.append(p)
        return p

    def export(self):
        return self.runtime.bank.export(self.name)

    def refresh_lambda_bias(self) -> None:
        """Kernels read copies of λ (the CPU kernel its output bias as a Python float, the Triton
        kernels the bank's stacked tables): update them after training steps."""
        self.slot.lambda_out_bias = {w: float(net[3].detach()) for w, net in self.slot.lambda_nets.items()}
        self.runtime.bank.invalidate_kernel_tables()
