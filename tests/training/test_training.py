"""`ldmole train` on a tiny model and a learnable synthetic multiple-choice task."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_config, write_char_tokenizer, write_tiny_model

from ldmole_cli.main import main
from ldmole_runtime import AdapterSet, LDMoleRuntime
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.training import trainer as trainer_mod
from ldmole_runtime.training.config import TrainConfig
from ldmole_runtime.training.step import new_training_adapter
from ldmole_runtime.training.trainer import train

KEYS = {"red": 0, "blue": 1, "green": 2, "gold": 3}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # a larger init than a real model's 0.02 lets the frozen random LM head express confident answers
    path = write_tiny_model(tmp_path_factory.mktemp("base") / "llama", tiny_config("llama", kv_heads=2,
                                                                                  initializer_range=0.2))
    return write_char_tokenizer(path)


def synthetic_mc(path, n, seed):
    """The answer letter is a fixed function of one keyword: learnable, and 25% by chance."""
    g = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = g.choice(sorted(KEYS))
            f.write(json.dumps({"question": f"Key {word}?", "choices": ["ox", "fig", "elm", "yak"],
                                "answer": KEYS[word]}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return synthetic_mc(d / "train.jsonl", 64, 0), synthetic_mc(d / "val.jsonl", 32, 1)


def config(base, data, out, **kw):
    settings = dict(base=str(base), data=str(data[0]), val_data=str(data[1]), task="mc", experts=4, rank=4,
                    alpha=8, lambda_hidden=16, dropout=0.0, epochs=3, batch_size=8, lr=1e-2, schedule="constant",
                    weight_decay=0.0, max_length=256, out=str(out), progress=False, device="cpu", mc_format="letter")
    settings.update(kw)
    cfg = TrainConfig(**settings)
    cfg.check()
    return cfg


def test_training_learns_the_task_and_saves_what_it_serves(base, data, tmp_path):
    metrics = train(config(base, data, tmp_path / "run", epochs=8))
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, 9))
    assert epochs[-1]["train"]["ce"] < 0.7 * epochs[0]["train"]["ce"]
    assert epochs[-1]["validation"]["accuracy"] >= 0.75  # chance is 0.25
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        ["adapter", "metrics.json", "train_config.json"] + [f"checkpoint-epoch{i}" for i in range(1, 9)])
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"][-1]["validation"]
        == epochs[-1]["validation"]
    )

    # the saved adapter, loaded as the server loads it, reproduces the validation accuracy
    rt = LDMoleRuntime.from_pretrained(base, adapters={"trained": tmp_path / "run" / "adapter"})
    from transformers import AutoTokenizer

    from ldmole_runtime.engine.llm import LLM

    llm = LLM(rt, block_size=8, num_blocks=64, tokenizer=AutoTokenizer.from_pretrained(base))
    from ldmole_runtime.data.datasets import load_jsonl, mc_prompt

    correct = 0
    val = load_jsonl(data[1], "mc")
    for ex in val:
        res = llm.score(mc_prompt(ex, "<s>"), [c for c in "ABCD"], adapter="trained")
        correct += res.best == ex.answer
    assert correct / len(val) == pytest.approx(epochs[-1]["validation"]["accuracy"])


def test_export_reload_gives_identical_outputs(base, data, tmp_path):
    from ldmole_runtime.adapters.init import new_adapter_set
    from ldmole_runtime.training.trainable import TrainableAdapter

    rt = LDMoleRuntime.from_pretrained(base)
    rt.load_adapter("t", new_adapter_set(rt.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=3, b_std=0.02))
    adapter = TrainableAdapter(rt, "t")
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    ids = torch.randint(3, 100, (2, 12))
    for _ in range(3):  # move every parameter away from its init
        loss = rt.model.lm_head_weight.new_zeros(())
        from ldmole_runtime.lora.adapter_batch import AdapterBatch
        from ldmole_runtime.model.attention import DenseCausalAttention
        from ldmole_runtime.model.decoder import ForwardContext

        ctx = ForwardContext(
            AdapterBatch.build(torch.zeros(24, dtype=torch.long), 1), rt.bank, DenseCausalAttention(2, 12), "dense"
        )
        hidden = rt.model(ids.reshape(-1), torch.arange(12).repeat(2), ctx)
        loss = torch.nn.functional.linear(hidden, rt.model.lm_head_weight).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapter.refresh_lambda_bias()
    adapter.export().save(tmp_path / "saved")
    fresh = LDMoleRuntime.from_pretrained(base, adapters={"t": tmp_path / "saved"})
    for backend in ("sparse", "dense"):
        saved, loaded = (m.forward(ids, "t", lora_backend=backend).logits for m in (rt, fresh))
        assert (saved - loaded).abs().max() <= 1e-6


def test_sparsity_control_lowers_active_experts(base, data, tmp_path):
    common = dict(experts=6, lambda_init="dense", epochs=2, lr=1e-2, lambda_lr=5e-2, lb=0.0)
    free = train(config(base, data, tmp_path / "free", reg=0.0, **common))
    capped = train(config(base, data, tmp_path / "capped", reg=50.0, k=2, **common))
    a_free = free["epochs"][-1]["validation"]["active_experts"]
    a_capped = capped["epochs"][-1]["validation"]["active_experts"]
    assert a_capped < a_free - 1.0, (a_free, a_capped)  # observed 3.21 -> 1.12
    assert a_capped < 2.0  # k = 2 caps it


def test_interrupted_run_keeps_its_last_checkpoint_and_resumes(base, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = trainer_mod.save_checkpoint

    def save_then_interrupt(out_dir, epoch, *args):
        path = real_save(out_dir, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt  # Ctrl-C right after the first epoch's checkpoint
        return path

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(config(base, data, out, epochs=2))
    AdapterSet.load(out / "checkpoint-epoch1" / "adapter")  # loadable
    assert not list(out.glob(".checkpoint-*"))
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real_save)
    metrics = train(config(base, data, out, epochs=2, resume=True))
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    AdapterSet.load(out / "adapter")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_torchrun(base, data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "ldmole_cli.main", "train", "--base", str(base), "--data", str(data[0]), "--val-data", str(data[1]),
           "--task", "mc", "--experts", "4", "--rank", "4", "--lambda-hidden", "16", "--epochs", "1",
           "--batch-size", "8", "--max-length", "256", "--out", str(out), "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-epoch1"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    AdapterSet.load(out / "adapter")


@pytest.mark.parametrize("flags, message", [
    (["--data", "/nonexistent.jsonl", "--task", "mc"], "nonexistent"),
    (["--task", "poetry"], "poetry"),
    (["--router", "banana"], "unknown router 'banana'"),
    (["--task", "classification", "--num-labels", "2"], "label"),
])
def test_bad_input_fails_before_compute(base, data, tmp_path, capsys, flags, message):
    cls = tmp_path / "cls.jsonl"
    cls.write_text(json.dumps({"text": "a", "label": 0}) + "\n" + json.dumps({"text": "b", "label": 5}) + "\n")
    argv = [
        "train",
        "--base",
        str(base),
        "--data",
        str(cls if "classification" in flags else data[0]),
        "--val-data",
        str(cls if "classification" in flags else data[1]),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    argv += flags
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "o" / "checkpoint-epoch1").exists()


def test_classification_and_completion_tasks_and_yaml_config(base, tmp_path):
    cls_train, cls_val = tmp_path / "cls_train.jsonl", tmp_path / "cls_val.jsonl"
    for path, seed in ((cls_train, 0), (cls_val, 1)):
        g = random.Random(seed)
        with open(path, "w") as f:
            for _ in range(40 if seed == 0 else 16):
                word = g.choice(sorted(KEYS))
                f.write(json.dumps({"text": f"the {word} one", "label": KEYS[word] % 2}) + "\n")
    yaml_file = tmp_path / "cls.yaml"
    yaml_file.write_text("task: classification\nnum_labels: 2\nrouter: topk\ntop_k: 2\nexperts: 4\nrank: 4\n"
                         "lambda_hidden: 16\ndropout: 0.0\nepochs: 6\nlr: 0.01\nschedule: cosine\nwarmup_steps: 2\n"
                         "batch_size: 8\nmax_length: 64\nprogress: false\ndevice: cpu\n")
    cfg = TrainConfig.from_sources(str(yaml_file), {"base": str(base), "data": str(cls_train), "val_data": str(cls_val),
                                                    "out": str(tmp_path / "cls")})
    metrics = train(cfg)
    assert metrics["task"] == "classification"
    assert metrics["epochs"][-1]["validation"]["accuracy"] >= 0.75  # chance 0.5
    saved = AdapterSet.load(tmp_path / "cls" / "adapter")
    assert saved.config.num_labels == 2 and saved.config.router == "topk" and saved.config.top_k == 2
    rt = LDMoleRuntime.from_pretrained(base, adapters={"cls": tmp_path / "cls" / "adapter"})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = torch.tensor([tok.encode("<s>the blue one</s>")])
    assert rt.forward(ids, "cls").logits.shape == (1, 2)  # served through the adapter's own score head

    comp = tmp_path / "comp.jsonl"
    comp.write_text("".join(json.dumps({"prompt": f"say {w}:", "completion": f" {w}{w}"}) + "\n" for w in KEYS) * 4)
    metrics = train(TrainConfig.from_sources(None, dict(
        base=str(base), data=str(comp), val_data=str(comp), task="completion", experts=4, rank=4, lambda_hidden=16,
        epochs=3, lr=1e-2, batch_size=4, max_length=64, progress=False, device="cpu", out=str(tmp_path / "comp"))))
    losses = [e["validation"]["loss"] for e in metrics["epochs"]]
    assert losses[-1] < losses[0]
    with pytest.raises(LDMoleError, match="unknown settings"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("learning_rate: 0.1\n")
        TrainConfig.from_sources(str(bad), {})


def test_generate_cli_after_training(base, data, tmp_path, capsys):
    train(config(base, data, tmp_path / "run", epochs=1))
    capsys.readouterr()
    assert main(["generate", "Key red?", "--base", str(base), "--adapter", str(tmp_path / "run" / "adapter"),
                 "--max-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.strip("\n")) <= 5  # five character tokens at most
    assert main(["generate", "Key red? Answer: ", "--base", str(base), "--adapter", str(tmp_path / "run" / "adapter"),
                 "--choices", "A|B|C|D"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and sum(line.startswith("*") for line in lines) == 1


def test_train_cli_prints_the_serve_command_for_its_adapter(base, data, tmp_path, capsys):
    import shlex

    from ldmole_server.build import parse_adapters

    out = tmp_path / "my-run"
    assert main(["train", "--base", str(base), "--data", str(data[0]), "--val-data", str(data[1]), "--task", "mc",
                 "--experts", "2", "--rank", "2", "--lambda-hidden", "8", "--epochs", "1", "--max-length", "128",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("serve it: "))
    argv = shlex.split(line.removeprefix("serve it: "))
    assert argv[:4] == ["ldmole", "serve", "--base", str(base)] and argv[4] == "--adapter"
    adapters = parse_adapters([argv[5]])
    assert adapters == {"my-run": str(out.resolve() / "adapter")}
    assert (out / "adapter" / "ldmole_adapter.json").is_file()


def test_adamole_recipe_trains_a_threshold_adapter(base, data, tmp_path):
    """`--router threshold` (AdaMoLE): its objective trains the task, the threshold layers learn, and
    the saved set serves as a threshold-routed set with the trainer's routing."""
    cfg = config(base, data, tmp_path / "run", router="threshold", lb=1e-3, epochs=6)
    metrics = train(cfg)
    last, first = metrics["epochs"][-1], metrics["epochs"][0]
    assert last["train"]["ce"] < 0.7 * first["train"]["ce"]
    assert last["validation"]["accuracy"] >= 0.75  # chance is 0.25
    assert 0 < last["train"]["load_balance"]
    saved = AdapterSet.load(tmp_path / "run" / "adapter")
    assert saved.config.router == "threshold"
    fresh = new_training_adapter(ModelConfig.from_dir(base), cfg, "mc").tensors  # the trainer's own init
    moved = [k for k in saved.tensors if k.endswith("threshold.weight")
             if not torch.equal(saved.tensors[k], fresh[k])]
    assert moved  # the threshold layers are trained, not frozen at init
    rt = LDMoleRuntime.from_pretrained(base, adapters={"t": tmp_path / "run" / "adapter"})
    out = rt.forward(torch.randint(3, 100, (2, 10)), "t", capture_routing=True)
    active = torch.stack([(p > 0).sum(-1) for p in out.routing.values()])
    assert active.min() >= 1 and active.max() <= 4


def test_adamole_balance_is_the_reference_formula():
    """E Σ_e f_e P_e of shared/docs/ADAMOLE.md, written out token by token."""
    from ldmole_runtime.lora.routing import threshold_router
    from ldmole_runtime.training.losses import adamole_balance

    g = torch.Generator().manual_seed(0)
    u, t = torch.randn(7, 4, generator=g), torch.rand(7, generator=g) * 0.25
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    p = threshold_router(u, t[:, None])
    gates = torch.softmax(u, -1)
    real = [i for i in range(7) if mask[i]]
    expected = 4 * sum(sum(float(p[i, e] > 0) for i in real) / len(real)
                       * sum(float(gates[i, e] - t[i]) for i in real) / len(real) for e in range(4))
    assert abs(adamole_balance(p, u, t, mask).item() - expected) <= 1e-6
