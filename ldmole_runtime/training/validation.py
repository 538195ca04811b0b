"""Validation during `ldmole train`: accuracy per task (cloze multiple choice through the serving
engine, as lm-eval scores it), letter-format and classification accuracy, completion loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldmole_runtime.model.runtime import LDMoleRuntime
from ldmole_runtime.training.config import TrainConfig
from ldmole_runtime.training.mc_eval import cloze_accuracy
from ldmole_runtime.training.step import ADAPTER_NAME, TrainStep, collate


def evaluate_all(step: TrainStep, val: dict[str, list], cfg: TrainConfig, pad_id: int,
                 scorer=None) -> tuple[dict, dict]:
    """(validation metrics, per-item correctness) per dataset; with several datasets the metrics
    also carry their mean accuracy under "accuracy". Correctness is kept where it is known per
    item (cloze evaluation), for paired tests between runs."""
    per_task = {name: evaluate(step, encoded, cfg, pad_id, scorer) for name, encoded in val.items()}
    items = {name: m.pop("correct") for name, m in per_task.items() if "correct" in m}
    if len(per_task) == 1:
        return next(iter(per_task.values())), items
    scored = [m for m in per_task.values() if "accuracy" in m]
    mean = {"accuracy": sum(m["accuracy"] for m in scored) / len(scored)} if scored else {}
    return mean | {"per_task": per_task}, items


@torch.no_grad()
def evaluate(step: TrainStep, encoded: list, cfg: TrainConfig, pad_id: int, scorer=None) -> dict:
    """mc cloze: acc / acc_norm by option log-likelihood (lm-eval's definitions) through the serving
    engine `scorer`; mc letter / classification: accuracy (letter: argmax over the option letters'
    logits after "Answer: "); completion: mean loss on the completions."""
    if not encoded:
        return {}
    step.adapter.refresh_lambda_bias()
    if encoded[0].options is not None:
        return _evaluate_cloze(scorer, encoded)
    correct, total, loss_sum = 0, 0, 0.0
    active = []
    for start in range(0, len(encoded), cfg.eval_batch_size):
        batch = collate(encoded[start:start + cfg.eval_batch_size], pad_id)
        capture = step.new_capture()
        hidden = step.hidden(batch, 0.0, capture, lora_backend="sparse")  # what serving runs
        mask = batch.mask.reshape(-1).to(hidden.device)
        active.append(torch.stack([(p > 0).float()[mask].sum(-1).mean() for p in capture.p.values()]).mean().item())
        if step.task == "mc":
            first = (batch.labels != -100).int().argmax(1).to(hidden.device)  # the position that predicts the letter
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
            width = max(len(c) for c in batch.choice_ids)  # questions may have 3, 4 or 5 options
            letters = torch.tensor([c + [c[0]] * (width - len(c)) for c in batch.choice_ids], device=h.device)
            valid = torch.arange(width, device=h.device)[None, :] < torch.tensor([len(c) for c in batch.choice_ids],
                                                                                    device=h.device)[:, None]
            scores = torch.gather(F.linear(h, step.runtime.model.lm_head_weight), 1, letters)
            scores = scores.masked_fill(~valid, float("-inf"))
            correct += (scores.argmax(1).cpu() == batch.answers).sum().item()
        elif step.task == "classification":
            logits, targets = step.logits(batch, hidden)
            correct += (logits.argmax(1) == targets).sum().item()
        else:
            logits, targets = step.logits(batch, hidden)
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            total += targets.numel()
            continue
        total += len(batch.answers)
    metrics = {"active_experts": sum(active) / len(active)}
    if step.task == "completion":
        metrics |= {"loss": loss_sum / max(total, 1)}
    else:
        metrics |= {"accuracy": correct / max(total, 1), "examples": total}
    return metrics


def _evaluate_cloze(scorer, encoded: list) -> dict:
    histogram = scorer.engine.expert_histogram.by_adapter
    before = list(histogram.get(ADAPTER_NAME, [None, 0.0, 0]))[1:]
    metrics = cloze_accuracy(scorer, encoded, ADAPTER_NAME)
    after = list(histogram.get(ADAPTER_NAME, [None, 0.0, 0]))[1:]
    tokens = after[1] - before[1]
    return {"active_experts": (after[0] - before[0]) / tokens if tokens else float("nan")} | metrics


def make_scorer(runtime: LDMoleRuntime, tokenizer, cfg: TrainConfig):
    """The serving engine over the training runtime (it reads the adapter's current weights), for
    cloze evaluation. No prefix cache: the weights change between evaluations under the same set
    identity, so cached blocks would be stale. CPU: the sparse path serving uses; GPU: dense, until
    the GPU kernels remove the sparse path's host syncs."""
    from ldmole_runtime.engine.llm import LLM

    lora_backend = "sparse" if runtime.device.type == "cpu" else "dense"
    return LLM(runtime, tokenizer=tokenizer, lora_backend=lora_backend, expert_sample_every=1,
               kv_cache_gib=cfg.eval_kv_cache_gib,
               enable_prefix_caching=False,
               max_model_len=min(cfg.max_length + 2, runtime.cfg.max_position_embeddings))
