"""One training forward: a padded batch of encoded examples through the frozen base with the
trainable adapter (the runtime's dense mixture path, with autograd), returning every loss term."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.model.attention import DenseCausalAttention
from ldmole_runtime.model.decoder import ForwardContext
from ldmole_runtime.model.runtime import LDMoleRuntime
from ldmole_runtime.training.config import TrainConfig
from ldmole_runtime.training.losses import LossWeights, TrainingCapture, objective
from ldmole_runtime.training.trainable import TrainableAdapter

ADAPTER_NAME = "train"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    labels: torch.Tensor  # [B, T], -100 outside the loss; labels[i] is the target of position i
    mask: torch.Tensor  # [B, T] real tokens
    lengths: torch.Tensor  # [B]
    answers: torch.Tensor  # [B] (mc: option index, classification: label; else -1)
    choice_ids: list[list[int]] | None


def collate(encoded: list, pad_id: int) -> Batch:
    T = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), T), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = True
    answers = torch.tensor([-1 if e.answer is None else e.answer for e in encoded])
    choices = [e.choice_token_ids for e in encoded] if encoded[0].choice_token_ids is not None else None
    return Batch(ids, labels, mask, mask.sum(1), answers, choices)


class TrainStep(nn.Module):
    """One forward of the frozen base with the trainable adapter: returns every loss term."""

    def __init__(self, runtime: LDMoleRuntime, adapter: TrainableAdapter, task: str, cfg: TrainConfig):
        super().__init__()
        self.runtime, self.adapter, self.task, self.cfg = runtime, adapter, task, cfg
        self.weights = LossWeights(cfg.ce, cfg.lb, cfg.reg, cfg.lam, cfg.k)

    def hidden(self, batch: Batch, dropout: float, capture=None, lora_backend: str = "dense") -> torch.Tensor:
        B, T = batch.input_ids.shape
        device = self.runtime.device
        ctx = ForwardContext(AdapterBatch.from_runs([(0, B * T)], 1, device), self.runtime.bank,
                             DenseCausalAttention(B, T), lora_backend, capture, dropout)
        positions = torch.arange(T, device=device).repeat(B)
        return self.runtime.model(batch.input_ids.to(device).reshape(-1), positions, ctx).view(B, T, -1)

    def logits(self, batch: Batch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of the positions in the loss."""
        device = hidden.device
        if self.task == "classification":
            pooled = hidden[torch.arange(hidden.shape[0], device=device), batch.lengths.to(device) - 1]
            weight, bias = self.adapter.slot.score
            return F.linear(pooled, weight, bias), batch.answers.to(device)
        labels = batch.labels.to(device)
        selected = labels != -100
        return F.linear(hidden[selected], self.runtime.model.lm_head_weight), labels[selected]

    def new_capture(self) -> TrainingCapture:
        return TrainingCapture()

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        capture = self.new_capture()
        hidden = self.hidden(batch, self.cfg.dropout, capture)
        logits, targets = self.logits(batch, hidden)
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)
        return objective(ce, capture, batch.mask.to(hidden.device).reshape(-1), self.weights)


def new_training_adapter(base_cfg, cfg: TrainConfig, task: str, **extra):
    """A fresh adapter set shaped by the training settings (B = 0 unless `extra` says otherwise)."""
    from ldmole_runtime.adapters.init import new_adapter_set

    return new_adapter_set(
        base_cfg, num_experts=cfg.experts, rank=cfg.rank, alpha=cfg.alpha, router=cfg.router_kind,
        target_modules=cfg.target_modules, lambda_hidden=cfg.lambda_hidden,
        num_labels=cfg.num_labels if task == "classification" else None, seed=cfg.seed,
        lambda_init=cfg.lambda_init, top_k=cfg.top_k, **extra)


def make_optimizer(adapter: TrainableAdapter, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the experts and routers, and the λ-network in its own group (--lambda-lr). Fused:
    one kernel over all tensors; the default on CPU steps each of the ~460 tensors in a Python loop
    of ~10 ops, a tenth of a training step's ops."""
    groups = [{"params": list(adapter.lora), "lr": cfg.lr}]
    if len(adapter.lambda_net):
        groups.append({"params": list(adapter.lambda_net), "lr": cfg.lambda_lr or cfg.lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)
