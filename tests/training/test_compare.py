"""Routing presets and `ldmole compare`: the sparse preset routes to fewer experts than the paper
preset, masked projections make no routing decisions, and the comparison's statistics are the
textbook ones (checked against scipy) on the runs' own per-item results."""

import json
import random

import pytest
import torch
from tiny_models import tiny_config, write_char_tokenizer, write_tiny_model

from ldmole_cli.main import main as cli_main
from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.adapters.spec import projection_shapes
from ldmole_runtime.engine.expert_stats import ActiveExpertCount
from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.model.attention import DenseCausalAttention
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.model.decoder import ForwardContext
from ldmole_runtime.training.compare import compare, format_table, ldmole_parameters
from ldmole_runtime.training.config import PRESETS, TrainConfig
from ldmole_runtime.training.trainer import train


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("compare") / "base",
                            tiny_config("llama", vocab_size=100, max_position_embeddings=512, initializer_range=0.2))
    return write_char_tokenizer(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A learnable multiple-choice task: the answer's text is a fixed function of one keyword."""
    folder = tmp_path_factory.mktemp("data")
    keys, choices = {"sun": 0, "moon": 1, "star": 2, "sky": 3}, ["ox", "fig", "elm", "yak"]
    files = []
    for name, n, seed in (("train", 64, 0), ("val", 40, 1)):
        g = random.Random(seed)
        path = folder / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                word = g.choice(sorted(keys))
                f.write(json.dumps({"question": f"Key {word}?", "choices": choices, "answer": keys[word]}) + "\n")
        files.append(path)
    return files


def settings(base, data, out, **kw):
    values = dict(base=str(base), data=str(data[0]), val_data=str(data[1]), task="mc", experts=4, rank=4, alpha=8,
                  lambda_hidden=16, dropout=0.0, epochs=3, batch_size=8, lr=3e-3, schedule="constant",
                  weight_decay=0.0, max_length=128, out=str(out), progress=False, device="cpu",
                  label_smoothing=0.0, eval_kv_cache_gib=0.01, target_modules=["q_proj", "v_proj", "gate_proj"])
    values.update(kw)
    return values


def test_presets_set_defaults_that_files_and_flags_override(tmp_path):
    sparse = TrainConfig.from_sources(None, {"preset": "sparse"})
    assert (sparse.reg, sparse.k, sparse.lambda_lr) == (PRESETS["sparse"]["reg"], 2, PRESETS["sparse"]["lambda_lr"])
    assert TrainConfig.from_sources(None, {"preset": "sparse", "k": 3}).k == 3
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: sparse\nreg: 0.5\n")
    from_file = TrainConfig.from_sources(str(yaml_file), {})
    assert (from_file.preset, from_file.reg) == ("sparse", 0.5)
    assert from_file.lambda_lr == PRESETS["sparse"]["lambda_lr"]
    paper = TrainConfig.from_sources(None, {})
    assert (paper.preset, paper.reg, paper.lam, paper.lambda_lr) == ("paper", 0.0, 0.0, None)
    from ldmole_runtime.errors import LDMoleError

    with pytest.raises(LDMoleError, match="unknown preset 'fast'; choose one of paper, sparse"):
        TrainConfig.from_sources(None, {"preset": "fast"})


def test_masked_projections_make_no_routing_decisions(base):
    """An adapter on q and v (not k) shares the q/k/v group: k's all-zero p is no routing decision,
    so every routed token's mean active experts is >= 1 and keys name only adapted projections."""
    runtime = LDMoleRuntime.from_pretrained(base)
    runtime.load_adapter("qv", new_adapter_set(runtime.cfg, num_experts=4, rank=4, lambda_hidden=16,
                                               target_modules=["q_proj", "v_proj"], seed=1))
    ids = torch.randint(0, 100, (2, 9))
    for backend in ("sparse", "dense"):
        out = runtime.forward(ids, "qv", lora_backend=backend, capture_routing=True)
        assert {k.split(".", 1)[1] for k in out.routing} == {"q_proj", "v_proj"}
        manual = torch.stack([(p > 0).sum(-1).float() for p in out.routing.values()]).mean(0).reshape(-1)
        counter = ActiveExpertCount(ids.numel(), runtime.device)
        with torch.inference_mode():
            batch = AdapterBatch.build(torch.zeros(ids.numel(), dtype=torch.long), 1)
            ctx = ForwardContext(batch, runtime.bank, DenseCausalAttention(2, 9), backend, counter)
            runtime.model(ids.reshape(-1), torch.arange(9).repeat(2), ctx)
        assert bool((counter.per_token_mean() >= 1).all())
        torch.testing.assert_close(counter.per_token_mean(), manual)


def test_sparse_preset_routes_to_fewer_experts_than_the_paper_preset(base, data, tmp_path):
    results = {}
    for preset in ("paper", "sparse"):
        cfg = TrainConfig.from_sources(None, settings(base, data, tmp_path / preset, preset=preset, epochs=4))
        results[preset] = train(cfg)["epochs"][-1]
    paper, sparse = (results[p]["validation"]["active_experts"] for p in ("paper", "sparse"))
    assert sparse <= 2.2, sparse  # the sparsity term caps tokens at k = 2
    assert paper >= sparse + 0.5, (paper, sparse)  # the reference objective leaves routing denser
    assert results["sparse"]["train"]["active_experts"] < results["paper"]["train"]["active_experts"]


def test_compare_rows_statistics_plot_and_reuse(base, data, tmp_path, capsys):
    from scipy.stats import binomtest

    cfg = TrainConfig.from_sources(None, settings(base, data, tmp_path / "unused"))
    out = tmp_path / "cmp"
    table = compare(cfg, ["base", "lora", "paper", "sparse"], out)
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(table))
    assert (out / "compare.png").stat().st_size > 1000
    entry = table["tasks"][str(data[0])]
    for row in ("base", "lora", "paper", "sparse"):
        metrics = json.loads((out / row / "metrics.json").read_text())
        validation = metrics["epochs"][-1]["validation"]
        predictions = json.loads((out / row / "predictions.json").read_text())[str(data[0])]
        assert entry[row]["acc"]["value"] == validation["accuracy"] and entry[row]["acc"]["n"] == 40
        assert entry[row]["acc_norm"]["value"] == validation["acc_norm"]
        for metric in ("acc", "acc_norm"):
            k = sum(predictions[metric])
            ci = binomtest(k, 40).proportion_ci(method="wilson")
            assert entry[row][metric]["ci95"] == pytest.approx([ci.low, ci.high], abs=1e-9)
            if row == "base":
                continue
            base_items = json.loads((out / "base" / "predictions.json").read_text())[str(data[0])][metric]
            only_row = sum(a and not b for a, b in zip(predictions[metric], base_items, strict=True))
            only_base = sum(b and not a for a, b in zip(predictions[metric], base_items, strict=True))
            expected = 1.0 if only_row + only_base == 0 else binomtest(only_row, only_row + only_base).pvalue
            assert entry[row][metric]["vs_base"]["p_value"] == pytest.approx(expected, rel=1e-9)
    # the trained rows learned the task; the base is the untrained base
    assert entry["paper"]["acc"]["value"] >= 0.9 and entry["lora"]["acc"]["value"] >= 0.9
    assert table["rows"]["base"]["parameters"] == 0 and table["rows"]["base"]["train_tokens_per_s"] is None
    # LoRA's budget: its parameter count within one rank's worth of LD-MoLE's
    base_cfg = ModelConfig.from_dir(base)
    budget = ldmole_parameters(cfg, base_cfg)
    shapes = projection_shapes(base_cfg)
    per_rank = base_cfg.num_layers * sum(sum(shapes[m]) for m in cfg.target_modules)
    assert table["rows"]["paper"]["parameters"] == budget
    assert abs(table["rows"]["lora"]["parameters"] - budget) <= per_rank
    assert entry["sparse"]["active_experts"] < entry["paper"]["active_experts"]
    text = format_table(table)
    assert all(row in text for row in ("base", "lora", "paper", "sparse")) and "McNemar" in text
    # a finished row of the same settings is reused, not retrained
    stamp = (out / "paper" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    compare(cfg, ["base", "paper"], out, make_plot=False)
    assert (out / "paper" / "metrics.json").stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().out


def test_compare_cli_refuses_what_the_rows_set(base, data, tmp_path, capsys):
    args = ["compare", "--base", str(base), "--data", str(data[0]), "--task", "mc", "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit):  # the rows set the objective: no such flag
        cli_main(args + ["--reg", "0.5"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("reg: 0.5\n")
    assert cli_main(args + ["--config", str(yaml_file)]) == 2
    assert "ldmole compare sets reg per row" in capsys.readouterr().err
    assert cli_main(args + ["--rows", "base,best"]) == 2
    assert "unknown compare rows ['best']" in capsys.readouterr().err
    assert cli_main(args + ["--mc-format", "letter"]) == 2
    assert "--mc-format cloze" in capsys.readouterr().err
