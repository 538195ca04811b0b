"""`ldmole bench-train`: training tokens/s of LD-MoLE against plain LoRA at the same rank budget.

Both train on one shared base (random weights of a named shape, frozen) with the trainer's own
step (`TrainStep`: forward, every loss term, backward, fused AdamW), on the same batches. Their
steps alternate, so that machine noise hits both alike, and each one's median step time gives its
tokens/s. LoRA's rank is E·r (the experts' total rank), at the same alpha / r.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ldmole_cli.bench import random_model
from ldmole_runtime.model.runtime import LDMoleRuntime


@dataclass
class TrainBenchSettings:
    shape: str = "smollm2-135m"
    experts: int = 8
    rank: int = 8
    lambda_hidden: int = 256
    target_modules: list[str] | None = None  # None: all seven projections
    preset: str = "paper"
    batch_size: int = 8
    seq_len: int = 128
    answer_tokens: int = 4  # positions in the loss per sequence (a multiple-choice answer's length)
    steps: int = 8
    seed: int = 0
    variants: tuple[str, ...] = field(default=("ldmole", "lora"))


def _trainer(model, s: TrainBenchSettings, variant: str):
    from ldmole_runtime.training.config import TrainConfig
    from ldmole_runtime.training.step import ADAPTER_NAME, TrainStep, make_optimizer, new_training_adapter
    from ldmole_runtime.training.trainable import TrainableAdapter

    cfg = TrainConfig.from_sources(None, {"preset": s.preset, "experts": s.experts, "rank": s.rank,
                                          "alpha": 2.0 * s.rank, "lambda_hidden": s.lambda_hidden,
                                          "target_modules": s.target_modules, "dropout": 0.1, "seed": s.seed})
    if variant == "lora":
        cfg.router, cfg.experts, cfg.rank, cfg.alpha = "lora", 1, s.experts * s.rank, 2.0 * s.experts * s.rank
    rt = LDMoleRuntime(model)  # the base's weights are shared, each runtime has its own bank
    rt.load_adapter(ADAPTER_NAME, new_training_adapter(rt.cfg, cfg, "mc", b_std=0.02))
    adapter = TrainableAdapter(rt, ADAPTER_NAME)
    step = TrainStep(rt, adapter, "mc", cfg).train()
    optimizer = make_optimizer(adapter, cfg)

    def run(batch) -> None:
        terms = step(batch)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def _batch(s: TrainBenchSettings, vocab: int, seed: int):
    from ldmole_runtime.training.step import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (s.batch_size, s.seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -s.answer_tokens - 1:-1] = ids[:, -s.answer_tokens:]  # labels[i] is the target of position i
    mask = torch.ones_like(ids, dtype=torch.bool)
    return Batch(ids, labels, mask, mask.sum(1), torch.zeros(s.batch_size, dtype=torch.long), None)


def run(s: TrainBenchSettings) -> dict:
    torch.manual_seed(s.seed)
    model = random_model(s.shape, torch.float32, "cpu", s.seed)
    trainers = {v: _trainer(model, s, v) for v in s.variants}
    batches = [_batch(s, model.cfg.vocab_size, s.seed + i) for i in range(s.steps + 1)]
    for train_step in trainers.values():
        train_step(batches[0])  # warm-up: allocator growth, first-call costs
    times: dict[str, list[float]] = {v: [] for v in s.variants}
    for batch in batches[1:]:
        for v, train_step in trainers.items():
            start = time.perf_counter()
            train_step(batch)
            times[v].append(time.perf_counter() - start)
    tokens = s.batch_size * s.seq_len
    result = {"shape": s.shape, "threads": torch.get_num_threads(), "batch_size": s.batch_size, "seq_len": s.seq_len,
              "adapter": {"experts": s.experts, "rank": s.rank, "lambda_hidden": s.lambda_hidden,
                          "target_modules": s.target_modules or "all seven", "preset": s.preset},
              "lora_rank": s.experts * s.rank, "steps": s.steps,
              "train_tokens_per_s": {v: round(tokens / statistics.median(t), 2) for v, t in times.items()}}
    if {"ldmole", "lora"} <= set(times):
        tps = result["train_tokens_per_s"]
        result["ldmole_over_lora"] = round(tps["ldmole"] / tps["lora"], 3)
    return result
