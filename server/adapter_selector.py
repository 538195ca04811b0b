"""MoLE-style adapter selection: `model: "auto"` picks an adapter set per request with a classifier.

The classifier is a sequence-classification model folder: any transformers
`AutoModelForSequenceClassification` (e.g. BERT-tiny, as in MoLE), or an adapter set of ours with a
classification head (what `ldmole train-selector` writes) on the served base. Its labels name
adapter sets (or the base's served name): from the model's `id2label`, the folder's
`selector_labels.json` (`router_labels.json`, its older name), or a JSON file given with `--adapter-selector-labels`.

It runs on CPU in its own thread, so the engine loop never waits for it, and batches what arrives
together: requests queue up while a batch is classified, and the next batch takes them all.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ldmole_runtime.adapters.adapter_set import LEGACY_SELECTOR_LABELS_NAME, SELECTOR_LABELS_NAME
from ldmole_runtime.errors import LDMoleError

MAX_BATCH = 32


def read_labels(path: Path) -> dict[int, str]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LDMoleError(f"{path}: not a readable JSON label map ({exc})") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise LDMoleError(f"{path}: expected a JSON object mapping label ids to adapter-set names")
    try:
        return {int(k): v for k, v in raw.items()}
    except ValueError:
        raise LDMoleError(f"{path}: label ids must be integers, got {sorted(raw)}") from None


class _HFClassifier:
    """A transformers sequence classifier and its own tokenizer."""

    def __init__(self, path: Path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise LDMoleError(f"--adapter-selector {path}: not a sequence-classification model folder ({exc})") from exc
        self.id2label = {int(k): v for k, v in (self.model.config.id2label or {}).items()}

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[int]:
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return self.model(**batch).logits.argmax(-1).tolist()


class _AdapterClassifier:
    """An adapter set of ours with a score head, on the served base (sharing its weights)."""

    def __init__(self, path: Path, runtime, tokenizer):
        from ldmole_runtime.adapters.adapter_set import AdapterSet
        from ldmole_runtime.model.runtime import LDMoleRuntime

        adapter = AdapterSet.load(path)
        if adapter.config.num_labels is None:
            raise LDMoleError(f"--adapter-selector {path}: the adapter set has no classification head (num_labels)")
        if tokenizer is None:
            raise LDMoleError("--adapter-selector with an adapter set needs the base's tokenizer")
        self.runtime = LDMoleRuntime(runtime.model)  # its own bank: the engine's is not touched
        self.runtime.load_adapter("selector", adapter)
        self.tokenizer = tokenizer
        self.id2label: dict[int, str] = {}

    def __call__(self, texts: list[str]) -> list[int]:
        from ldmole_runtime.data.datasets import ClassificationExample, encode

        # encoded exactly as the trainer encoded its examples (start token + text + end token)
        max_len = self.runtime.cfg.max_position_embeddings
        return [int(self.runtime.classify(encode(ClassificationExample(t, 0), "classification", self.tokenizer,
                                                 max_len).input_ids, "selector").argmax()) for t in texts]


class AdapterSelector:
    def __init__(self, path: str | Path, labels_path: str | Path | None, runtime, tokenizer):
        path = Path(path)
        if not path.is_dir():
            raise LDMoleError(f"--adapter-selector {path}: folder does not exist")
        is_adapter = (path / "ldmole_adapter.json").is_file()
        self.classifier = _AdapterClassifier(path, runtime, tokenizer) if is_adapter else _HFClassifier(path)
        if labels_path is not None:
            self.labels = read_labels(Path(labels_path))
        elif any((path / name).is_file() for name in (SELECTOR_LABELS_NAME, LEGACY_SELECTOR_LABELS_NAME)):
            found = [name for name in (SELECTOR_LABELS_NAME, LEGACY_SELECTOR_LABELS_NAME) if (path / name).is_file()]
            self.labels = read_labels(path / found[0])
        else:
            self.labels = self.classifier.id2label
        if not self.labels:
            raise LDMoleError(f"--adapter-selector {path}: no label map (id2label, {SELECTOR_LABELS_NAME}, or "
                              "--adapter-selector-labels)")
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ldmole-adapter-selector")
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.busy = False
        self.decisions: dict[str, int] = {}

    def check_targets(self, served: list[str]) -> None:
        """Every label must name a served set (or the base): checked at start-up, and when sets unload."""
        unknown = sorted({name for name in self.labels.values() if name not in served})
        if unknown:
            raise LDMoleError(f"the adapter selector's labels name adapter sets that are not served: {unknown}; "
                              f"served: {served}")

    def label_of(self, index: int) -> str:
        if index not in self.labels:
            raise LDMoleError(f"the adapter selector predicted label {index}, which its label map does not name")
        return self.labels[index]

    async def select(self, text: str) -> str:
        """The served name the classifier picks for this text."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((text, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        name = await future
        self.decisions[name] = self.decisions.get(name, 0) + 1
        return name

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                try:
                    labels = await loop.run_in_executor(self.executor, self.classifier, [t for t, _ in batch])
                    results = [self.label_of(i) for i in labels]
                except Exception as exc:  # one bad batch fails its requests, not the server
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), name in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(name)
        finally:
            self.busy = False

    def close(self) -> None:
        self.executor.shutdown(wait=False)
