"""MoLE-style adapter selection through the real server and the real `openai` client: a tiny random
BERT classifier picks one of four PEFT LoRAs (ranks 64/32/16/8) for `model: "auto"`; every decision
equals transformers' own classifier argmax on the same text, and every answer equals a direct
request to the chosen set."""

import argparse
import json

import pytest
import torch
from live_server import LiveServer, write_model
from openai import BadRequestError, OpenAI
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from ldmole_runtime.errors import LDMoleError
from ldmole_server.build import build_state
from ldmole_server.launch import add_serve_flags

LORAS = {"r64": 64, "r32": 32, "r16": 16, "r8": 8}
TEXTS = ["What is 12 plus 30?", "def add(a, b):", "Translate 'cat' into French.", "Is the sky green?",
         "Name a prime number.", "print('hello')", "Why do leaves fall?", "SELECT * FROM t;", "Tell me a joke.",
         "Solve x + 3 = 7.", "import numpy as np", "Who wrote Hamlet?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    base, _ = write_model(root)
    loras = {}
    for i, (name, r) in enumerate(LORAS.items()):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.3)
        model.save_pretrained(root / name)
        loras[name] = root / name
    # a tiny random BERT (2 layers, hidden 32) whose labels are the four sets; a larger init than
    # BERT's 0.02 so that different texts land on different sets
    torch.manual_seed(0)
    bert = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        initializer_range=0.2, num_labels=4, id2label=dict(enumerate(LORAS)),
        label2id={n: i for i, n in enumerate(LORAS)}))
    bert.save_pretrained(root / "router")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "router")
    return base, loras, root / "router"


def reference_decisions(router_dir, texts):
    tok = AutoTokenizer.from_pretrained(router_dir)
    model = AutoModelForSequenceClassification.from_pretrained(router_dir).eval()
    with torch.no_grad():
        return [model.config.id2label[int(model(**tok(t, return_tensors="pt")).logits.argmax())] for t in texts]


def test_auto_requests_follow_the_classifier(setup):
    base, loras, router_dir = setup
    expected = reference_decisions(router_dir, TEXTS)
    assert len(set(expected)) >= 3  # the test really routes to different sets
    with LiveServer(base, loras, adapter_selector=router_dir) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none")
        for text, want in zip(TEXTS, expected, strict=True):
            auto = client.completions.create(model="auto", prompt=text, max_tokens=6, temperature=0)
            direct = client.completions.create(model=want, prompt=text, max_tokens=6, temperature=0)
            assert auto.model == want
            assert auto.choices[0].text == direct.choices[0].text
        # concurrent requests are classified in batches: the same decisions
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(TEXTS)) as pool:
            models = list(pool.map(lambda t: client.completions.create(model="auto", prompt=t, max_tokens=1).model,
                                   TEXTS))
        assert models == expected
        # chat: the last user message decides
        chat = client.chat.completions.create(
            model="auto", max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": TEXTS[1]}])
        assert chat.model == expected[1]
        metrics = srv_metrics(srv)
        for name in set(expected):
            n = 2 * expected.count(name) + (name == expected[1])
            assert f'ldmole:adapter_selector_decisions_total{{adapter="{name}"}} {float(n)}' in metrics


def srv_metrics(srv):
    import httpx
    return httpx.get(srv.url + "/metrics").text


def test_auto_without_a_selector_is_a_clear_400(setup):
    base, loras, _ = setup
    with LiveServer(base, loras) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none")
        with pytest.raises(BadRequestError, match="needs an adapter selector"):
            client.completions.create(model="auto", prompt="hi", max_tokens=2)


def test_selector_labels_naming_unknown_sets_are_refused(setup, tmp_path):
    base, loras, router_dir = setup
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "r64", "1": "r32", "2": "nope", "3": "r8"}))
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    args = parser.parse_args(["--base", str(base), "--adapter-selector", str(router_dir),
                              "--adapter-selector-labels", str(labels)]
                             + sum((["--adapter", f"{n}={p}"] for n, p in loras.items()), []))
    with pytest.raises(LDMoleError, match=r"not served: \['nope'\]"):
        build_state(args)


def test_older_names_still_work(setup, tmp_path):
    """`--request-router`/`--request-router-labels` and a folder's `router_labels.json` (what the
    selector was called before) are still read."""
    import shutil

    base, loras, router_dir = setup
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "r64", "1": "gone", "2": "r32", "3": "r8"}))
    adapters = sum((["--adapter", f"{n}={p}"] for n, p in loras.items()), [])
    args = parser.parse_args(["--base", str(base), "--request-router", str(router_dir),
                              "--request-router-labels", str(labels)] + adapters)
    assert (args.adapter_selector, args.adapter_selector_labels) == (str(router_dir), str(labels))
    with pytest.raises(LDMoleError, match=r"not served: \['gone'\]"):
        build_state(args)
    legacy = tmp_path / "legacy"
    shutil.copytree(router_dir, legacy)
    (legacy / "router_labels.json").write_text(json.dumps({"0": "r64", "1": "r32", "2": "old", "3": "r8"}))
    with pytest.raises(LDMoleError, match=r"not served: \['old'\]"):
        build_state(parser.parse_args(["--base", str(base), "--adapter-selector", str(legacy)] + adapters))


def test_train_selector_then_serve_auto(setup, tmp_path):
    """`ldmole train-selector` on labelled prompts (the keyword decides the set), then the server routes
    held-out prompts with it: decisions match the labels, answers match direct requests."""
    import random

    from ldmole_cli.main import main

    base, loras, _ = setup
    words = {"r64": "apple", "r32": "zebra", "r8": "quartz"}
    g = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            name = g.choice(sorted(words))
            text = f"{g.choice(['Tell', 'Ask', 'Say'])} {words[name]} {g.randrange(100)}"
            out.append({"text": text, "adapter": name})
        return out

    data, held_out = tmp_path / "route.jsonl", rows(12)
    data.write_text("\n".join(json.dumps(r) for r in rows(96)) + "\n")
    assert main(["train-selector", "--data", str(data), "--base", str(base), "--out", str(tmp_path / "router"),
                 "--epochs", "4", "--lr", "1e-2", "--device", "cpu"]) == 0
    router = tmp_path / "router" / "adapter"
    assert json.loads((router / "selector_labels.json").read_text()) == {"0": "r32", "1": "r64", "2": "r8"}
    with LiveServer(base, loras, adapter_selector=router) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none")
        right = 0
        for row in held_out:
            auto = client.completions.create(model="auto", prompt=row["text"], max_tokens=3, temperature=0)
            direct = client.completions.create(model=auto.model, prompt=row["text"], max_tokens=3, temperature=0)
            assert auto.choices[0].text == direct.choices[0].text
            right += auto.model == row["adapter"]
    assert right >= 11  # of 12 held-out prompts


def test_classify_reads_the_last_token_even_when_it_is_the_pad_token(tmp_path):
    """SmolLM2's end token is also its pad token, and the trainer ends every text with it: a single
    unpadded input is read at its last token, as the trainer reads it, not before it."""
    from tiny_models import tiny_config, write_tiny_model

    from ldmole_runtime import LDMoleRuntime, new_adapter_set

    base = write_tiny_model(tmp_path / "base", tiny_config("llama", pad_token_id=2, eos_token_id=2))
    rt = LDMoleRuntime.from_pretrained(base)
    rt.load_adapter("c", new_adapter_set(rt.cfg, num_experts=2, rank=2, lambda_hidden=8, num_labels=3, seed=1))
    ids = [5, 9, 14, 2]
    hidden = rt.forward(torch.tensor([ids]), "c").hidden[0]
    weight, bias = rt.bank.slots[0].score
    expected = torch.softmax(torch.nn.functional.linear(hidden[-1], weight, bias), -1)
    assert torch.allclose(rt.classify(ids, "c"), expected, atol=1e-6)
    assert not torch.allclose(torch.softmax(torch.nn.functional.linear(hidden[-2], weight, bias), -1), expected)
