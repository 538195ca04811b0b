"""AdaMoLE adapters: the reference AdaMoLE code's checkpoint and outputs reproduced (fp32, 1e-4, the
same selected experts) on every backend, directly and after `ldmole import`; and checkpoints whose
config and tensors disagree refused with one clear line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmole_cli.main import main
from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.errors import CheckpointError

TOL = 1e-4


@pytest.fixture(scope="module")
def fixture_dir(official_fixtures):
    root = official_fixtures.parent / "official-adamole" / "llama-lm"
    assert root.is_dir(), f"AdaMoLE fixtures not found at {root}"
    return root


def forward(root, adapter, tmp_path, backend):
    expected = load_file(str(root / "expected.safetensors"))
    save_file({"input_ids": expected["input_ids"]}, str(tmp_path / "in.safetensors"))
    assert main(["forward", "--base", str(root / "base"), "--adapter", str(adapter), "--inputs",
                 str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors"),
                 "--lora-backend", backend]) == 0
    return load_file(str(tmp_path / "out.safetensors")), expected


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_forward_matches_the_adamole_code(fixture_dir, tmp_path, backend):
    got, expected = forward(fixture_dir, fixture_dir / "adapter", tmp_path, backend)
    assert (got["logits"] - expected["logits"]).abs().max() <= TOL
    keys = sorted(k for k in expected if k.startswith(("routing.", "threshold.")))
    assert len(keys) == 28 and sorted(k for k in got if k.startswith(("routing.", "threshold."))) == keys
    for key in keys:
        assert (got[key] - expected[key]).abs().max() <= TOL, key
        if key.startswith("routing."):
            assert torch.equal(got[key] > 0, expected[key] > 0), f"selected experts differ in {key}"
    selected = torch.stack([(expected[k] > 0).sum(-1) for k in keys if k.startswith("routing.")])
    assert selected.min() == 1 and selected.max() == 4  # the fixture really varies the count


def test_import_then_forward_matches(fixture_dir, tmp_path):
    assert main(["import", str(fixture_dir / "adapter"), "--out", str(tmp_path / "native"),
                 "--base", str(fixture_dir / "base")]) == 0
    assert AdapterSet.load(tmp_path / "native").config.router == "threshold"
    got, expected = forward(fixture_dir, tmp_path / "native", tmp_path, "cpu")
    assert (got["logits"] - expected["logits"]).abs().max() <= TOL


def broken_copy(fixture_dir, tmp_path, config=None, tensors=None):
    dst = tmp_path / "broken"
    shutil.copytree(fixture_dir / "adapter", dst)
    if config is not None:
        raw = json.loads((dst / "adapter_config.json").read_text())
        config(raw)
        (dst / "adapter_config.json").write_text(json.dumps(raw))
    if tensors is not None:
        sd = torch.load(dst / "adapter_model.bin", weights_only=True)
        tensors(sd)
        torch.save(sd, dst / "adapter_model.bin")
    return dst


PREFIX = "base_model.model.model.layers.1.self_attn.q_proj."


@pytest.mark.parametrize("break_it,message", [
    (dict(config=lambda c: c.update(num_experts=5)), "missing"),
    (dict(config=lambda c: c.update(lora_rank=8)), "lora_rank 8"),
    (dict(config=lambda c: c.update(peft_type="MOLE")), "peft_type 'MOLE'"),
    (dict(config=lambda c: c.update(target_modules=["q_proj"])), "does not list"),
    (dict(config=lambda c: c.update(bias="all")), "bias 'all'"),
    (dict(tensors=lambda sd: sd.pop(PREFIX + "lora_threshold.bias")), "lora_threshold.bias"),
    # the duplicates share storage with the experts in the file: replace, do not modify in place
    (dict(tensors=lambda sd: sd.update({PREFIX + "moe_layer.experts.2.lora_A.weight":
                                        sd[PREFIX + "lora_A.2.weight"] + 1.0})), "differs"),
    (dict(tensors=lambda sd: sd.update({PREFIX + "lora_gating.weight": torch.zeros(3, 64)})), "lora_gating has shape"),
    (dict(tensors=lambda sd: sd.update({"base_model.model.lm_head.weight": torch.zeros(2)})), "unexpected tensor"),
])
def test_mismatched_checkpoints_are_refused(fixture_dir, tmp_path, break_it, message):
    path = broken_copy(fixture_dir, tmp_path, **break_it)
    with pytest.raises(CheckpointError, match=message):
        AdapterSet.load(path)
