"""Training examples and the JSONL files they come from.

Three tasks: ``mc`` (multiple choice), ``completion`` (supervised fine-tuning on a completion) and
``classification`` (a ``score`` head on the last token). Everything a user can get wrong is reported
as an ``LDMoleError`` naming the file, line and field while the data is read, before any model is
loaded or any compute is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ldmole_runtime.errors import LDMoleError


@dataclass
class MCExample:
    question: str
    choices: list[str]
    answer: int  # index into choices
    # the cloze prompt that precedes " " + an answer's text (lm-eval's standard form for the task);
    # None: "Question: {question}\nAnswer:"
    context: str | None = None

    @property
    def cloze_context(self) -> str:
        return self.context if self.context is not None else f"Question: {self.question}\nAnswer:"

@dataclass
class CompletionExample:
    prompt: str
    completion: str


@dataclass
class ClassificationExample:
    text: str
    label: int


Example = MCExample | CompletionExample | ClassificationExample

TASKS = ("mc", "completion", "classification")
SPLITS = ("train", "validation", "test")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IGNORE_INDEX = -100


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise LDMoleError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LDMoleError(f"limit must be a positive number of examples, got {limit!r}")


# ---- JSONL files -------------------------------------------------------------------------------------

def _get(row: dict, name: str, where: str, types, what: str):
    if name not in row:
        raise LDMoleError(f"{where}: missing field {name!r}")
    value = row[name]
    # bool is an int subclass in Python, but `"label": true` is a data bug, not label 1.
    if isinstance(value, bool) or not isinstance(value, types):
        raise LDMoleError(f"{where}: field {name!r} must be {what}, got {json.dumps(value)[:60]}")
    return value


def _parse_mc(row: dict, where: str) -> MCExample:
    question = _get(row, "question", where, str, "a string")
    choices = _get(row, "choices", where, list, "a list of strings")
    if not all(isinstance(c, str) for c in choices):
        raise LDMoleError(f"{where}: field 'choices' must be a list of strings")
    if not 2 <= len(choices) <= len(OPTION_LETTERS):
        raise LDMoleError(f"{where}: field 'choices' has {len(choices)} options; "
                          f"2 to {len(OPTION_LETTERS)} are supported")
    answer = _get(row, "answer", where, (int, str), 'an option index or a letter "A".."Z"')
    if isinstance(answer, str):
        if len(answer) != 1 or answer not in OPTION_LETTERS:
            raise LDMoleError(f'{where}: field \'answer\' must be an option index or a letter "A".."Z", got {answer!r}')
        index = OPTION_LETTERS.index(answer)
    else:
        index = answer
    if not 0 <= index < len(choices):
        last = len(choices) - 1
        raise LDMoleError(f"{where}: field 'answer' {answer!r} is out of range for {len(choices)} choices "
                          f"(0..{last} or A..{OPTION_LETTERS[last]})")
    context = row.get("context")
    if context is not None and not isinstance(context, str):
        raise LDMoleError(f"{where}: field 'context' must be a string (the cloze prompt before an answer)")
    return MCExample(question, choices, index, context)


def _parse_completion(row: dict, where: str) -> CompletionExample:
    prompt = _get(row, "prompt", where, str, "a string")
    completion = _get(row, "completion", where, str, "a string")
    if not completion:
        raise LDMoleError(f"{where}: field 'completion' is empty; there is nothing to learn")
    return CompletionExample(prompt, completion)


def _parse_classification(row: dict, where: str) -> ClassificationExample:
    text = _get(row, "text", where, str, "a string")
    label = _get(row, "label", where, int, "an integer class index")
    if label < 0:
        raise LDMoleError(f"{where}: field 'label' must be >= 0, got {label}")
    return ClassificationExample(text, label)


_PARSERS = {"mc": _parse_mc, "completion": _parse_completion, "classification": _parse_classification}


def load_jsonl(path, task: str) -> list[Example]:
    """Examples of `task`, one JSON object per line (blank lines are skipped, extra fields ignored).

    mc: {"question": str, "choices": [str, ...], "answer": index or letter "A".."Z", optional
        "context": the cloze prompt before an answer's text (default "Question: {question}\nAnswer:")}
    completion: {"prompt": str, "completion": str}
    classification: {"text": str, "label": int >= 0}
    """
    _check_task(task)
    return read_jsonl(path, _PARSERS[task])


def read_jsonl(path, parse) -> list:
    """parse(row, where) of every JSON object in the file, each error naming its line."""
    path = Path(path)
    examples = []
    try:
        # Binary, decoded line by line, so a bad byte is reported on its own line number.
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # tolerate a BOM
                except UnicodeDecodeError:
                    raise LDMoleError(f"{path} line {n}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LDMoleError(f"{path} line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(row, dict):
                    raise LDMoleError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
                examples.append(parse(row, f"{path} line {n}"))
    except OSError as e:
        raise LDMoleError(f"cannot read {path}: {e.strerror or e}") from None
    if not examples:
        raise LDMoleError(f"{path}: no examples (the file is empty)")
    return examples


def check_labels(examples: list[ClassificationExample], num_labels: int) -> None:
    """Every label must index the score head's `num_labels` outputs."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise LDMoleError(f"num_labels must be a positive integer, got {num_labels!r}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, ClassificationExample):
            raise LDMoleError(f"example {i} is not a classification example ({type(ex).__name__})")
        if not 0 <= ex.label < num_labels:
            raise LDMoleError(f"example {i} has label {ex.label}, outside 0..{num_labels - 1} "
                              f"for num_labels={num_labels}")

