"""The answer-text (cloze) objective for multiple choice: its loss by hand, lm-eval's acc / acc_norm,
mixtures with per-task accuracy, and a trained adapter served with the trainer's own figures."""

import json
import random

import pytest
import torch
from tiny_models import tiny_config, write_char_tokenizer, write_tiny_model

from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.data.datasets import MCExample, cloze_pair, encode, load_jsonl
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.model.tokenizer import load_tokenizer
from ldmole_runtime.training.config import TrainConfig
from ldmole_runtime.training.mc_eval import lm_eval_choices
from ldmole_runtime.training.step import ADAPTER_NAME, TrainStep, collate
from ldmole_runtime.training.trainable import TrainableAdapter
from ldmole_runtime.training.trainer import train


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("cloze") / "base",
                            tiny_config("llama", vocab_size=100, max_position_embeddings=512, initializer_range=0.2))
    return write_char_tokenizer(path)


def synthetic(path, n, seed, keys, choices):
    """The right answer's text is a fixed function of one keyword: learnable; chance = 1 / options."""
    g = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = g.choice(sorted(keys))
            f.write(json.dumps({"question": f"Key {word}?", "choices": choices, "answer": keys[word]}) + "\n")
    return path


def test_cloze_pair_is_lm_evals_split(base):
    tok = load_tokenizer(base)
    # the context's trailing space moves into the continuation; the whole is tokenized at once
    assert cloze_pair(tok, "Q: hi\nA: ", "yes") == (tok.encode("Q: hi\nA:"), tok.encode(" yes"))
    enc = encode(MCExample("hi", ["no", "yes"], 1, "Q: hi\nA:"), "mc", tok, 64, "cloze")
    assert enc.input_ids == tok.encode("Q: hi\nA: yes")
    assert enc.options == (tok.encode("Q: hi\nA:"), [tok.encode(" no"), tok.encode(" yes")], [2, 3])
    # labels[i] is the target of position i: exactly the answer's tokens
    assert [t for t in enc.labels if t != -100] == tok.encode(" yes")


def test_answer_text_loss_matches_a_hand_computation(base):
    tok = load_tokenizer(base)
    runtime = LDMoleRuntime.from_pretrained(base)
    runtime.load_adapter(ADAPTER_NAME, new_adapter_set(runtime.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=3,
                                                       b_std=0.3))
    cfg = TrainConfig(base=str(base), lb=0.0, label_smoothing=0.0, dropout=0.0)
    step = TrainStep(runtime, TrainableAdapter(runtime, ADAPTER_NAME), "mc", cfg)
    examples = [MCExample("cat", ["red", "blue", "green"], 1, "Colour of cat:"),
                MCExample("sky at night", ["dark", "bright"], 0, "Sky:")]
    encoded = [encode(e, "mc", tok, 64, "cloze") for e in examples]
    ce = step(collate(encoded, 0))["ce"]
    # by hand: -mean over every answer token of log p(token | everything before it)
    logprobs = []
    assert len(encoded) == len(examples)
    for e in encoded:
        logits = runtime.forward(torch.tensor([e.input_ids]), ADAPTER_NAME, lora_backend="dense").logits[0]
        lp = torch.log_softmax(logits, -1)
        ctx_len = len(e.options[0])
        answer = e.input_ids[ctx_len:]
        logprobs += [lp[ctx_len - 1 + i, t].item() for i, t in enumerate(answer)]
    assert float(ce.detach()) == pytest.approx(-sum(logprobs) / len(logprobs), abs=1e-5)


def test_acc_and_acc_norm_are_lm_evals_definitions():
    """Against lm-eval's own multiple-choice metrics (ConfigurableTask.process_results)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    g = random.Random(0)
    docs = [{"q": f"q{i}", "choices": [("x" * g.randrange(1, 12)) for _ in range(4)], "gold": g.randrange(4)}
            for i in range(200)]
    task = ConfigurableTask(config={
        "task": "tiny", "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}),
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]})
    differ = 0
    for doc in docs:
        lls = [g.uniform(-20, -1) for _ in range(4)]
        theirs = task.process_results(doc, [(ll, False) for ll in lls])
        acc, acc_norm = lm_eval_choices(lls, [len(c) for c in doc["choices"]])
        assert theirs["acc"] == float(acc == doc["gold"]) and theirs["acc_norm"] == float(acc_norm == doc["gold"])
        differ += acc != acc_norm
    assert differ > 10  # the length normalisation mattered on many of them


def config(base, train_files, val_files, out, **kw):
    settings = dict(base=str(base), data=",".join(map(str, train_files)), val_data=",".join(map(str, val_files)),
                    task="mc", experts=4, rank=4, alpha=8, lambda_hidden=16, dropout=0.0, epochs=6, batch_size=8,
                    lr=1e-2, schedule="constant", weight_decay=0.0, max_length=128, out=str(out), progress=False,
                    device="cpu", label_smoothing=0.0, eval_kv_cache_gib=0.01)
    settings.update(kw)
    cfg = TrainConfig(**settings)
    cfg.check()
    return cfg


def test_mixture_trains_and_reports_per_task_accuracy(base, tmp_path):
    a_keys, b_keys = {"sun": 0, "moon": 1, "star": 2}, {"red": 1, "blue": 0}
    files = {}
    for name, keys, choices in (("a", a_keys, ["ox", "fig", "elm"]), ("b", b_keys, ["up", "down"])):
        files[name] = (synthetic(tmp_path / f"{name}.jsonl", 48, 0, keys, choices),
                       synthetic(tmp_path / f"{name}_val.jsonl", 24, 1, keys, choices))
    metrics = train(config(base, [files["a"][0], files["b"][0]], [files["a"][1], files["b"][1]], tmp_path / "run"))
    assert metrics["train_examples"] == 96 and metrics["validation_examples"] == 48
    first, last = metrics["epochs"][0]["validation"], metrics["epochs"][-1]["validation"]
    per_task = last["per_task"]
    assert set(per_task) == {str(files["a"][0]), str(files["b"][0])}
    for task_metrics in per_task.values():
        assert task_metrics["examples"] == 24 and task_metrics["accuracy"] >= 0.9
        assert {"acc_norm", "active_experts"} <= set(task_metrics)
    assert last["accuracy"] == pytest.approx(sum(m["accuracy"] for m in per_task.values()) / 2)
    assert last["accuracy"] > first["accuracy"] or first["accuracy"] >= 0.9


def test_trained_cloze_adapter_serves_with_the_trainers_accuracy(base, tmp_path):
    keys = {"sun": 0, "moon": 1, "star": 2, "sky": 3}
    choices = ["ox", "fig", "elm", "yak"]
    train_file = synthetic(tmp_path / "t.jsonl", 64, 0, keys, choices)
    val_file = synthetic(tmp_path / "v.jsonl", 32, 1, keys, choices)
    metrics = train(config(base, [train_file], [val_file], tmp_path / "run", epochs=3, lr=3e-3))
    reported = metrics["epochs"][-1]["validation"]
    llm = LLM(base, adapters={"trained": str(tmp_path / "run" / "adapter")}, block_size=4, num_blocks=256)
    tok = llm.engine.tokenizer
    acc = acc_norm = 0
    for ex in load_jsonl(val_file, "mc"):
        res = llm.score(tok.encode(ex.cloze_context), [tok.encode(" " + c) for c in ex.choices], adapter="trained")
        pick, pick_norm = lm_eval_choices([c.sum_logprob for c in res.choices], [len(c) for c in ex.choices])
        acc += pick == ex.answer
        acc_norm += pick_norm == ex.answer
    assert reported["accuracy"] == acc / 32 and reported["acc_norm"] == acc_norm / 32
    # per-item correctness of the last evaluation, for paired tests
    items = json.loads((tmp_path / "run" / "predictions.json").read_text())[str(train_file)]
    assert len(items["acc"]) == 32 and sum(items["acc"]) == acc and sum(items["acc_norm"]) == acc_norm
