"""`ldmole train`: LD-MoLE adapters trained with the paper's objective, through the serving forward.

The adapter's weights are the runtime bank's tensors (`TrainableAdapter`), and the forward is the
runtime's own dense mixture path with autograd, so the saved adapter serves exactly as trained.
Data-parallel under `torchrun` (DDP: NCCL on GPUs, gloo on CPU); batch sizes are per process and
only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.data.datasets import (
    ClassificationExample,
    CompletionExample,
    MCExample,
    check_labels,
    encode,
    load_dataset,
)
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.default_base import resolve_base
from ldmole_runtime.model.runtime import LDMoleRuntime
from ldmole_runtime.model.tokenizer import load_tokenizer
from ldmole_runtime.training.config import TrainConfig
from ldmole_runtime.training.step import ADAPTER_NAME, TrainStep, collate, make_optimizer, new_training_adapter
from ldmole_runtime.training.trainable import TrainableAdapter
from ldmole_runtime.training.validation import evaluate_all, make_scorer

TASK_OF = {MCExample: "mc", CompletionExample: "completion", ClassificationExample: "classification"}


def load_examples(cfg: TrainConfig, tokenizer):
    """Read, check and tokenize everything before any compute is spent. `cfg.data` may name several
    datasets (a mixture): training takes all their examples, shuffled together (so each task is
    sampled in proportion to its size, after --limit-train caps each); validation stays per task."""
    names = cfg.datasets
    val_names = cfg.val_data.split(",") if cfg.val_data else names
    if len(val_names) != len(names):
        raise LDMoleError(f"--val-data names {len(val_names)} datasets, --data {len(names)}; give one per dataset")
    train, val = [], {}
    for name, val_name in zip(names, val_names, strict=True):
        train += load_dataset(name, cfg.task, cfg.train_split, cfg.limit_train)
        val[name] = load_dataset(val_name, cfg.task, cfg.val_split, cfg.limit_val)
    if not train:
        raise LDMoleError(f"{cfg.data}: no training examples")
    task = TASK_OF[type(train[0])]
    for name, examples in [("training", train), *val.items()]:
        if any(TASK_OF[type(e)] != task for e in examples):
            raise LDMoleError(f"{name} data mixes tasks: every dataset of a run must be a {task} task")
    if task == "classification":
        if cfg.num_labels is None:
            raise LDMoleError("classification needs --num-labels")
        check_labels(train, cfg.num_labels)
        for examples in val.values():
            check_labels(examples, cfg.num_labels)

    def enc(examples):
        return [encode(e, task, tokenizer, cfg.max_length, cfg.mc_format) for e in examples]

    return task, enc(train), {name: enc(examples) for name, examples in val.items()}


# ---- checkpoints ------------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(out.glob("checkpoint-epoch*"), key=lambda p: int(p.name.removeprefix("checkpoint-epoch")))
    return done[-1] if done else None


def save_checkpoint(out: Path, epoch: int, adapter: TrainableAdapter, optimizer, scheduler, history: list) -> Path:
    """Written beside its final place and renamed in one step: an interrupted run (Ctrl-C) leaves
    the previous checkpoint intact and loadable, never half of a new one."""
    target = out / f"checkpoint-epoch{epoch}"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    try:
        adapter.export().save(tmp / "adapter")
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "history": json.dumps(history)}, tmp / "trainer_state.pt")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- the loop -----------------------------------------------------------------------------------------
def _schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    total = max(cfg.epochs * steps_per_epoch, 1)
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "multistep":
            epoch = step // max(steps_per_epoch, 1)
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        progress = (step - warm) / max(total - warm, 1)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _device(cfg: TrainConfig, local_rank: int) -> str:
    if cfg.device != "auto":
        return cfg.device
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def train(cfg: TrainConfig) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    is_main = rank == 0
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)

    base = resolve_base(cfg.base)
    tokenizer = load_tokenizer(base, needed_for="training")
    task, train_enc, val_enc = load_examples(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    runtime = LDMoleRuntime.from_pretrained(base, dtype="float32", device=device)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if resume_from is not None:
        adapter_set = AdapterSet.load(resume_from / "adapter")
    else:
        adapter_set = new_training_adapter(runtime.cfg, cfg, task)
    runtime.load_adapter(ADAPTER_NAME, adapter_set)
    adapter = TrainableAdapter(runtime, ADAPTER_NAME)
    step_module = TrainStep(runtime, adapter, task, cfg)
    model = nn.parallel.DistributedDataParallel(step_module) if world > 1 else step_module

    optimizer = make_optimizer(adapter, cfg)
    per_rank = math.ceil(len(train_enc) / world)
    steps_per_epoch = math.ceil(per_rank / (cfg.batch_size * cfg.grad_accum))
    scheduler = _schedule(cfg, optimizer, steps_per_epoch)
    history: list = []
    first_epoch = 1
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = json.loads(state["history"])
        first_epoch = state["epoch"] + 1
    scorer = make_scorer(runtime, tokenizer, cfg) if is_main and task == "mc" and cfg.mc_format == "cloze" else None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _null()
    start_time = time.time()
    items: dict = {}  # the last evaluation's per-item correctness, per dataset
    for epoch in range(first_epoch, cfg.epochs + 1):
        order = list(range(len(train_enc)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        mine = order[rank::world]
        batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        sums: dict[str, float] = {}
        tokens, t0 = 0, time.time()
        bar = _progress(len(batches), f"epoch {epoch}/{cfg.epochs}", cfg.progress and is_main)
        step_module.train()
        for b, index in enumerate(batches):
            batch = collate([train_enc[i] for i in index], pad_id)
            last_of_group = (b + 1) % cfg.grad_accum == 0 or b + 1 == len(batches)
            sync = model.no_sync() if world > 1 and not last_of_group else _null()
            with sync, autocast:
                terms = model(batch)
            (terms["loss"] / cfg.grad_accum).backward()
            if last_of_group:
                torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.clip, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            values = {key: float(value.detach()) for key, value in terms.items()}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            tokens += int(batch.mask.sum())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.3f}", ce=f"{values['ce']:.3f}",
                                lb=f"{values['load_balance']:.3f}", experts=f"{values['active_experts']:.2f}",
                                tok_s=f"{tokens * world / max(time.time() - t0, 1e-9):.0f}")
        if bar is not None:
            bar.close()
        step_module.eval()
        record = {"epoch": epoch, "train": {k: v / max(len(batches), 1) for k, v in sums.items()},
                  "train_tokens_per_s": tokens * world / max(time.time() - t0, 1e-9),
                  "wall_s": time.time() - start_time}
        if is_main:
            record["validation"], items = evaluate_all(step_module, val_enc, cfg, pad_id, scorer)
            history.append(record)
            save_checkpoint(out, epoch, adapter, optimizer, scheduler, history)
            print(f"epoch {epoch}: train loss {record['train'].get('loss', float('nan')):.4f}, "
                  f"validation {json.dumps(record['validation'])}", flush=True)
        if world > 1:
            dist.barrier()

    if cfg.epochs == 0 and is_main:  # B starts at zero: this measures the bare base under the same protocol
        step_module.eval()
        validation, items = evaluate_all(step_module, val_enc, cfg, pad_id, scorer)
        history.append({"epoch": 0, "validation": validation})
        print(f"untrained (= base) validation {json.dumps(history[-1]['validation'])}", flush=True)

    metrics = {"task": task, "train_examples": len(train_enc),
               "validation_examples": sum(len(v) for v in val_enc.values()),
               "world_size": world, "epochs": history, "config": cfg.to_dict()}
    if is_main:
        final = latest_checkpoint(out)
        if final is not None:
            if (out / "adapter").exists():
                shutil.rmtree(out / "adapter")
            shutil.copytree(final / "adapter", out / "adapter")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if items:  # whether each validation item was right, in dataset order: for paired tests
            (out / "predictions.json").write_text(json.dumps(items) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)
