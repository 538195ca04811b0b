"""Routing reports: statistics against a brute-force computation, padding, files written."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from tiny_models import tiny_config, write_char_tokenizer, write_tiny_model

from ldmole_cli.report import run_report
from ldmole_cli.report_plots import write_report
from ldmole_cli.report_stats import per_token_mean_bin_edges, routing_statistics, text_batches
from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.runtime import LDMoleRuntime

E = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("base") / "qwen3", tiny_config("qwen3", kv_heads=2))


@pytest.fixture(scope="module")
def runtime(base_path):
    rt = LDMoleRuntime.from_pretrained(base_path)
    rt.load_adapter("ld", new_adapter_set(rt.cfg, num_experts=E, rank=2, lambda_hidden=8, b_std=0.05, seed=1))
    rt.load_adapter("dense", new_adapter_set(rt.cfg, num_experts=E, rank=2, lambda_hidden=8, b_std=0.05, seed=2,
                                             lambda_bias=-30.0))
    rt.load_adapter("part", new_adapter_set(rt.cfg, num_experts=3, rank=2, router="softmax", b_std=0.05, seed=3,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    return rt


def padded_batches(pad_id: int = 0, seed: int = 0):
    """Two right-padded batches of rows with different real lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T in ((3, 12), (2, 9)):
        ids = torch.randint(3, 300, (B, T), generator=g)
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
        mask = (torch.arange(T)[None, :] < lens[:, None]).long()
        out.append((torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), mask))
    return out


def brute_force(rt, adapter, batches):
    """The statistics from the raw routing tensors: all real tokens' p and λ, then plain numpy."""
    p_all, lam_all = {}, {}
    for ids, mask in batches:
        out = rt.forward(ids, adapters=adapter, capture_routing=True)
        m = mask.bool()
        for key in out.routing:
            p_all.setdefault(key, []).append(out.routing[key][m].double().numpy())
            lam_all.setdefault(key, []).append(out.lambdas[key][m].double().numpy())
    p_all = {k: np.concatenate(v) for k, v in p_all.items()}
    lam_all = {k: np.concatenate(v) for k, v in lam_all.items()}
    return p_all, lam_all


def test_statistics_match_brute_force(runtime):
    batches = padded_batches()
    stats = routing_statistics(runtime, "ld", batches)
    p_all, lam_all = brute_force(runtime, "ld", batches)

    L, projs = runtime.cfg.num_layers, stats["projections"]
    assert projs == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    n = int(sum(m.sum() for _, m in batches))
    assert stats["tokens"] == n and stats["num_experts"] == E and stats["num_layers"] == L
    assert stats["decisions"] == n * L * len(projs)

    hist = np.zeros(E + 1, dtype=np.int64)
    per_token = np.zeros(n)
    means, lams = [], []
    for layer in range(L):
        for j, proj in enumerate(projs):
            p = p_all[f"{layer}.{proj}"]
            assert p.shape == (n, E)
            k = (p > 0).sum(1)
            per_token += k / (L * len(projs))
            hist += np.bincount(k, minlength=E + 1)
            means.append(k.mean())
            assert stats["active_experts"]["mean"][layer][j] == pytest.approx(k.mean(), abs=1e-12)
            active = (p > 0).sum(0)
            np.testing.assert_allclose(stats["expert_usage"]["freq"][layer][j], active / active.sum(), atol=1e-12)
            np.testing.assert_allclose(stats["expert_usage"]["prop"][layer][j], p.mean(0), atol=1e-9)
            np.testing.assert_allclose(stats["expert_usage"]["activation_rate"][layer][j], active / n, atol=1e-12)
            lam = lam_all[f"{layer}.{proj}"]
            assert not np.isnan(lam).any()
            assert stats["lambda"]["mean"][layer][j] == pytest.approx(lam.mean(), abs=1e-9)
            lams.append(lam)

    # routing really varies, so the comparison above means something
    assert 1 < stats["mean_active_experts"] < E
    assert (hist[1:] > 0).sum() >= 2
    assert stats["active_experts"]["histogram"]["k"] == list(range(1, E + 1))
    assert stats["active_experts"]["histogram"]["counts"] == hist[1:].tolist()
    assert stats["active_experts"]["histogram"]["zero_active"] == hist[0] == 0
    assert stats["mean_active_experts"] == pytest.approx(np.mean(means), abs=1e-12)

    pt = stats["active_experts"]["per_token_mean"]
    edges = per_token_mean_bin_edges(E)
    assert pt["bin_edges"] == edges.tolist()
    # bins [lo, hi) but the last [lo, E], compared exactly (means sit on the edges often)
    M = L * len(projs)
    counts = [0] * (len(edges) - 1)
    for total in np.rint(per_token * M).astype(int):
        mean = Fraction(int(total), M)
        counts[min(i for i in range(len(counts)) if mean < Fraction(edges[i + 1]) or i == len(counts) - 1)] += 1
    assert pt["counts"] == counts
    assert sum(pt["counts"]) == n
    assert pt["mean"] == pytest.approx(per_token.mean(), abs=1e-12)
    assert pt["std"] == pytest.approx(per_token.std(), abs=1e-9)
    assert pt["min"] == pytest.approx(per_token.min()) and pt["max"] == pytest.approx(per_token.max())

    all_p = np.stack([p_all[f"{layer}.{proj}"] for layer in range(L) for proj in projs])  # [M, n, E]
    overall_active = (all_p > 0).sum((0, 1))
    overall_freq = overall_active / overall_active.sum()
    np.testing.assert_allclose(stats["expert_usage"]["overall_freq"], overall_freq, atol=1e-12)
    np.testing.assert_allclose(stats["expert_usage"]["overall_prop"], all_p.mean((0, 1)), atol=1e-9)
    lb = stats["expert_usage"]["load_balance"]
    assert lb["cv_overall"] == pytest.approx(overall_freq.std() / overall_freq.mean(), abs=1e-9)
    freq = (all_p > 0).sum(1) / (all_p > 0).sum((1, 2))[:, None]
    switch = E * (freq * all_p.mean(1)).sum(1)
    assert lb["switch_balance_mean"] == pytest.approx(switch.mean(), abs=1e-9)
    assert lb["cv_per_module_mean"] == pytest.approx((freq.std(1) / freq.mean(1)).mean(), abs=1e-9)

    by_q = stats["expert_usage"]["by_projection"]["q_proj"]
    np.testing.assert_allclose(
        by_q["freq"], np.mean([stats["expert_usage"]["freq"][layer][0] for layer in range(L)], 0)
    )
    assert stats["lambda"]["available"]
    all_lam = np.concatenate(lams)
    assert stats["lambda"]["overall_mean"] == pytest.approx(all_lam.mean(), abs=1e-9)
    assert stats["lambda"]["overall_std"] == pytest.approx(all_lam.std(), abs=1e-6)


def test_padding_is_excluded(runtime):
    a = routing_statistics(runtime, "ld", padded_batches(pad_id=0))
    b = routing_statistics(runtime, "ld", padded_batches(pad_id=217))
    assert a == b
    # and the padded positions would have counted otherwise: all-ones masks give other numbers
    full = [(ids, torch.ones_like(m)) for ids, m in padded_batches(pad_id=217)]
    c = routing_statistics(runtime, "ld", full)
    assert c["tokens"] > a["tokens"]
    # a batch of padding only contributes nothing
    ids, mask = padded_batches()[1]
    d = routing_statistics(runtime, "ld", padded_batches() + [(ids, torch.zeros_like(mask))])
    assert d == a


def test_all_experts_active_with_low_lambda(runtime):
    stats = routing_statistics(runtime, "dense", padded_batches())
    assert stats["mean_active_experts"] == E
    assert np.all(np.array(stats["active_experts"]["mean"]) == E)
    assert stats["active_experts"]["histogram"]["counts"] == [0] * (E - 1) + [stats["decisions"]]
    assert stats["lambda"]["overall_mean"] < -20
    np.testing.assert_allclose(stats["expert_usage"]["overall_freq"], [1 / E] * E)


def test_partial_targets_and_router_without_lambda(runtime):
    stats = routing_statistics(runtime, "part", padded_batches())
    assert stats["projections"] == ["q_proj", "v_proj", "down_proj"]  # k_proj shares q's router group, unadapted
    assert stats["num_experts"] == 3 and stats["mean_active_experts"] == 3  # softmax: every expert is active
    assert not stats["lambda"]["available"]
    assert all(math.isnan(v) for row in stats["lambda"]["mean"] for v in row)
    assert math.isnan(stats["lambda"]["overall_mean"])


def test_write_report(runtime, tmp_path):
    stats = routing_statistics(runtime, "ld", padded_batches())
    paths = write_report(stats, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == sorted(["report.json", "active_experts_heatmap.png", "experts_per_token_hist.png",
                            "expert_usage.png", "lambda_heatmap.png"])
    for p in paths:
        assert p.is_file() and p.parent == tmp_path / "out"
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == PNG_SIGNATURE and len(data) > 1024
    loaded = json.loads((tmp_path / "out" / "report.json").read_text())
    assert loaded == stats  # every number is finite here, so JSON holds exactly the same values

    # NaN λ becomes null in JSON, and no λ plot is written
    part = routing_statistics(runtime, "part", padded_batches())
    paths = write_report(part, tmp_path / "part")
    assert "lambda_heatmap.png" not in {p.name for p in paths} and len(paths) == 4
    text = (tmp_path / "part" / "report.json").read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["lambda"]["overall_mean"] is None and loaded["lambda"]["mean"][0][0] is None
    assert loaded["expert_usage"]["freq"] == part["expert_usage"]["freq"]
    # a report.json read back can be rendered again
    assert len(write_report(loaded, tmp_path / "again")) == 4


def test_bad_input(runtime):
    with pytest.raises(LDMoleError, match="unknown adapter"):
        routing_statistics(runtime, "nope", padded_batches())
    with pytest.raises(LDMoleError, match="no real tokens"):
        routing_statistics(runtime, "ld", [])
    ids, mask = padded_batches()[0]
    with pytest.raises(LDMoleError, match="shape"):
        routing_statistics(runtime, "ld", [(ids, mask[:, :-1])])
    with pytest.raises(LDMoleError, match="only 0 and 1"):
        routing_statistics(runtime, "ld", [(ids, mask * 2)])
    with pytest.raises(LDMoleError, match="routing_statistics"):
        write_report({"num_experts": 2}, "/tmp/unused")


class FakeTokenizer:
    """Characters as token ids: enough to test batching without a tokenizer file."""
    pad_token_id = None
    eos_token_id = 2

    def __call__(self, text, truncation=True, max_length=None):
        ids = [3 + (ord(c) % 290) for c in text]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


def test_text_batches():
    texts = ["hello world", "hi", "", "a much longer text than the others"]
    batches = list(text_batches(FakeTokenizer(), texts, batch_size=3, max_length=8))
    assert [tuple(ids.shape) for ids, _ in batches] == [(3, 8), (1, 8)]
    ids, mask = batches[0]
    assert mask.tolist() == [[1] * 8, [1, 1] + [0] * 6, [0] * 8]
    assert ids[1, 2:].tolist() == [2] * 6  # no pad id: eos pads
    assert ids[0].tolist() == FakeTokenizer()("hello wo")["input_ids"]
    with pytest.raises(LDMoleError):
        list(text_batches(FakeTokenizer(), "not a list", 2, 8))
    with pytest.raises(LDMoleError):
        list(text_batches(FakeTokenizer(), texts, 0, 8))


def test_run_report(base_path, tmp_path):
    """The whole pipeline, with the tokenizer loaded from the base folder (tokenizer=None)."""
    base = write_tiny_model(tmp_path / "base", tiny_config("qwen3", kv_heads=2))
    write_char_tokenizer(base)
    tokenizer = None
    adapter = new_adapter_set(LDMoleRuntime.from_pretrained(base).cfg, num_experts=E, rank=2, lambda_hidden=8,
                              b_std=0.05, seed=1)
    adapter.save(tmp_path / "my-adapter")
    with pytest.raises(LDMoleError, match="tokenizer files"):  # base_path holds no tokenizer files
        run_report(str(base_path), str(tmp_path / "my-adapter"), ["x"], str(tmp_path / "r0"))
    with pytest.raises(LDMoleError, match="empty"):
        run_report(str(base), str(tmp_path / "my-adapter"), ["", " "], str(tmp_path / "r1"), tokenizer=tokenizer)
    with pytest.raises(LDMoleError, match="non-empty list"):
        run_report(str(base), str(tmp_path / "my-adapter"), [], str(tmp_path / "r2"), tokenizer=tokenizer)

    texts = ["hello there", "a longer line of text to route", "x"]
    stats = run_report(str(base), str(tmp_path / "my-adapter"), texts, str(tmp_path / "out"), batch_size=2,
                       max_length=16, tokenizer=tokenizer)
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(base)
    assert stats["adapter"] == "my-adapter" and stats["texts"] == 3
    assert stats["tokens"] == sum(min(len(tokenizer(t)["input_ids"]), 16) for t in texts)
    assert (tmp_path / "out" / "report.json").is_file()
    assert len(list((tmp_path / "out").glob("*.png"))) == 4
