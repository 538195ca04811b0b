"""`ldmole train-selector`: train an adapter selector (MoLE-style) with the ordinary trainer.

Labelled prompts, JSONL of {"text": ..., "adapter": ...}, become a classification task over the
adapter names (sorted: label i is the i-th name); `ldmole train` trains a set with a classification
head on the base, and its adapter folder gets `selector_labels.json`, so that
`ldmole serve --adapter-selector RUN/adapter` serves `model: "auto"` with it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ldmole_runtime.adapters.adapter_set import SELECTOR_LABELS_NAME
from ldmole_runtime.data.examples import read_jsonl
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.training.config import TrainConfig
from ldmole_runtime.training.trainer import train


def _parse_routing(row: dict, where: str) -> tuple[str, str]:
    text, adapter = row.get("text"), row.get("adapter")
    if not isinstance(text, str) or not isinstance(adapter, str) or not text or not adapter:
        raise LDMoleError(f'{where}: expected {{"text": "...", "adapter": "..."}} with non-empty strings')
    return text, adapter


def read_routing_data(path: str | Path) -> list[tuple[str, str]]:
    """(text, adapter) pairs, one JSON object per line."""
    return read_jsonl(path, _parse_routing)


def task_questions(spec: str, split: str, limit: int | None) -> list[tuple[str, str]]:
    """Labelled prompts from built-in datasets: `arc_easy=arc,social_iqa=siqa` labels each dataset's
    questions with an adapter name (the first `limit` of each, after a seeded shuffle)."""
    from ldmole_runtime.data.datasets import load_dataset

    rows = []
    for part in spec.split(","):
        dataset, sep, adapter = part.partition("=")
        if not sep or not dataset.strip() or not adapter.strip():
            raise LDMoleError(f"--tasks takes DATASET=ADAPTER pairs, comma-separated; got {part!r}")
        examples = load_dataset(dataset.strip(), None, split)
        if not all(hasattr(e, "question") for e in examples):
            raise LDMoleError(f"--tasks: {dataset} has no questions (use a multiple-choice dataset)")
        random.Random(0).shuffle(examples)
        rows += [(e.question, adapter.strip()) for e in examples[:limit]]
    return rows


def split_validation(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of each adapter's examples (at least one each)."""
    if not 0 < fraction < 1:
        raise LDMoleError(f"--val-fraction must be in (0, 1), got {fraction}")
    g = random.Random(seed)
    train_rows, val_rows = [], []
    for name in sorted({a for _, a in rows}):
        mine = [r for r in rows if r[1] == name]
        g.shuffle(mine)
        k = max(1, round(len(mine) * fraction))
        if k >= len(mine):
            raise LDMoleError(f"adapter {name!r} has {len(mine)} example(s): too few to hold some out for validation")
        val_rows += mine[:k]
        train_rows += mine[k:]
    return train_rows, val_rows


def train_selector(data: str | None, val_data: str | None, val_fraction: float, overrides: dict,
                 tasks: str | None = None, limit_per_task: int | None = None) -> dict:
    """Train on labelled prompts (`data`, or built-in datasets' questions: `tasks`, validated on
    their validation splits); returns the trainer's metrics plus the label map."""
    if (data is None) == (tasks is None):
        raise LDMoleError("give labelled prompts with --data, or built-in datasets with --tasks (one of them)")
    if tasks is not None:
        train_rows = task_questions(tasks, "train", limit_per_task)
        val_rows = task_questions(tasks, "validation", limit_per_task)
    elif val_data:
        train_rows, val_rows = read_routing_data(data), read_routing_data(val_data)
    else:
        train_rows, val_rows = split_validation(read_routing_data(data), val_fraction, overrides.get("seed", 0))
    names = sorted({a for _, a in train_rows})
    if len(names) < 2:
        raise LDMoleError(f"an adapter selector needs at least two adapters to choose between; the data names {names}")
    unseen = sorted({a for _, a in val_rows} - set(names))
    if unseen:
        raise LDMoleError(f"validation data names adapters the training data does not: {unseen}")
    out = Path(overrides.get("out", "runs/selector"))
    files = out / "selector_data"
    files.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", train_rows), ("validation", val_rows)):
        with open(files / f"{split}.jsonl", "w") as f:
            for text, name in part:
                f.write(json.dumps({"text": text, "label": names.index(name)}) + "\n")
    settings = dict(router="lora", target_modules=["q_proj", "v_proj"], rank=8, alpha=16.0, epochs=2, lr=5e-4,
                    schedule="constant", weight_decay=0.0, dropout=0.0, max_length=256) | overrides
    cfg = TrainConfig(**settings | dict(data=str(files / "train.jsonl"), val_data=str(files / "validation.jsonl"),
                                        task="classification", num_labels=len(names), out=str(out)))
    cfg.check()
    metrics = train(cfg)
    labels = {str(i): name for i, name in enumerate(names)}
    if (out / "adapter").is_dir():
        (out / "adapter" / SELECTOR_LABELS_NAME).write_text(json.dumps(labels, indent=2) + "\n")
    return metrics | {"labels": labels}
