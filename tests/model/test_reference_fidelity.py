"""Acceptance: `ldmole forward` reproduces what the reference LD-MoLE code computed (fp32, 1e-4)."""

import pytest
from safetensors.torch import load_file, save_file

from ldmole_cli.main import main

TOL = 1e-4


@pytest.mark.parametrize("case", ["qwen3-lm", "qwen3-cls"])
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])  # every LoRA backend
def test_forward_matches_reference_code(official_fixtures, tmp_path, case, backend):
    root = official_fixtures / case
    expected = load_file(str(root / "expected.safetensors"))
    save_file({"input_ids": expected["input_ids"]}, str(tmp_path / "in.safetensors"))
    rc = main(["forward", "--base", str(root / "base"), "--adapter", str(root / "adapter"),
               "--inputs", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors"),
               "--dtype", "float32", "--lora-backend", backend])
    assert rc == 0
    got = load_file(str(tmp_path / "out.safetensors"))

    assert got["logits"].shape == expected["logits"].shape
    assert (got["logits"] - expected["logits"]).abs().max() <= TOL
    routing_keys = sorted(k for k in expected if k.startswith("routing."))
    assert routing_keys and sorted(k for k in got if k.startswith("routing.")) == routing_keys
    for key in routing_keys:
        assert (got[key] - expected[key]).abs().max() <= TOL, key
        assert ((got[key] > 0) == (expected[key] > 0)).all(), f"active experts differ in {key}"
        lam = key.replace("routing.", "lambda.")
        assert (got[lam] - expected[lam]).abs().max() <= TOL, lam
    # the fixtures are only a real test if routing is sparse and varies per token
    active = (expected[routing_keys[0]] > 0).sum(-1)
    assert active.min() < active.max()


def test_import_then_forward_matches(official_fixtures, tmp_path):
    root = official_fixtures / "qwen3-lm"
    assert main(["import", str(root / "adapter"), "--out", str(tmp_path / "native"), "--base", str(root / "base")]) == 0
    expected = load_file(str(root / "expected.safetensors"))
    save_file({"input_ids": expected["input_ids"]}, str(tmp_path / "in.safetensors"))
    assert main(["forward", "--base", str(root / "base"), "--adapter", str(tmp_path / "native"),
                 "--inputs", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors")]) == 0
    got = load_file(str(tmp_path / "out.safetensors"))
    assert (got["logits"] - expected["logits"]).abs().max() <= TOL
