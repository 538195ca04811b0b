"""Acceptance: the sparse path equals the dense all-experts reference on mixed-adapter batches of
every adapter kind (LD-MoLE with each router, AdaMoLE, a PEFT LoRA saved by peft) and the base."""

import pytest
import torch
from tiny_models import tiny_config, write_tiny_model

from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.model.runtime import LDMoleRuntime


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("base") / "qwen3", tiny_config("qwen3", kv_heads=2))
    rt = LDMoleRuntime.from_pretrained(path)
    cfg = rt.cfg
    rt.load_adapter("wide", new_adapter_set(cfg, num_experts=8, rank=4, alpha=8, lambda_hidden=32, seed=1, b_std=0.05))
    rt.load_adapter("narrow", new_adapter_set(cfg, num_experts=3, rank=2, alpha=4, lambda_hidden=16, seed=2, b_std=0.05,
                                              target_modules=["q_proj", "v_proj", "down_proj"]))
    rt.load_adapter("lora", new_adapter_set(cfg, num_experts=1, rank=6, alpha=12, seed=3, b_std=0.05))
    # a λ-network bias of -30 drives λ far below 0: sparsegen then activates every expert
    rt.load_adapter("all", new_adapter_set(cfg, num_experts=5, rank=4, lambda_hidden=16, seed=4, b_std=0.05,
                                           lambda_bias=-30.0))
    rt.load_adapter("soft", new_adapter_set(cfg, num_experts=4, rank=3, router="softmax", seed=5, b_std=0.05))
    rt.load_adapter("ada", new_adapter_set(cfg, num_experts=6, rank=2, router="threshold", seed=6, b_std=0.05))
    rt.load_adapter("peft", peft_lora(path, tmp_path_factory.mktemp("peft")))
    return rt


def peft_lora(base, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=5, lora_alpha=10, target_modules=["k_proj", "o_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("backend", ["sparse", "cpu", "triton"])
def test_mixed_batch_sparse_equals_dense(runtime, backend):
    """Every sparse backend (the C kernel; the Triton kernels, interpreted on CPU) against the
    dense torch reference."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 300, (9, 13), generator=g)
    rows = ["wide", "narrow", None, "lora", "all", "soft", "wide", "ada", "peft"]
    ids = torch.tensor([runtime.adapter_index(a) for a in rows])[:, None].repeat(1, 13)
    ids[6, ::3] = runtime.adapter_index("narrow")  # sets also mix inside one row
    ids[6, 1::4] = -1
    sparse = runtime.forward(input_ids, ids, lora_backend=backend, capture_routing=True)
    dense = runtime.forward(input_ids, ids, lora_backend="dense", capture_routing=True)
    assert (sparse.logits - dense.logits).abs().max() <= 1e-5
    for key in dense.routing:
        assert torch.equal(sparse.routing[key] > 0, dense.routing[key] > 0)
        # λ of the Sparsegen sets, AdaMoLE's thresholds of "ada": each in its own capture, NaN elsewhere
        assert torch.allclose(sparse.lambdas[key], dense.lambdas[key], atol=1e-5, equal_nan=True)
        assert torch.allclose(sparse.thresholds[key], dense.thresholds[key], atol=1e-5, equal_nan=True)
    assert dense.thresholds["0.q_proj"][7].isfinite().all() and dense.lambdas["0.q_proj"][7].isnan().all()
    assert dense.lambdas["0.q_proj"][0].isfinite().all() and dense.thresholds["0.q_proj"][0].isnan().all()

    # the mixture really is sparse and per-token, and the dense set really activates all its experts
    active = (sparse.routing["0.q_proj"] > 0).sum(-1)
    assert active[0].min() < active[0].max() <= 8
    assert (active[4] == 5).all()
    assert (active[3] == 1).all()
    assert (active[2] == 0).all()  # bare-base row: no routing at all
    assert 1 <= active[7].min() < active[7].max()  # AdaMoLE: a varying number above the threshold


def test_rows_are_isolated_from_each_other(runtime):
    """A row's output does not depend on which sets the other rows of the batch use."""
    input_ids = torch.randint(0, 300, (4, 9), generator=torch.Generator().manual_seed(1))
    rows = ["wide", "narrow", None, "lora"]
    mixed = runtime.forward(input_ids, rows).logits
    for i, name in enumerate(rows):
        alone = runtime.forward(input_ids[i:i + 1], name).logits
        assert (mixed[i] - alone[0]).abs().max() <= 1e-5
    assert (mixed[0] - runtime.forward(input_ids[:1]).logits[0]).abs().max() > 1e-3  # adapters do move logits


def test_single_expert_equals_merged_lora(runtime, tmp_path):
    """E = 1 is plain LoRA: the same as the base with W + (alpha/r) B A merged into its weights."""
    adapter = new_adapter_set(runtime.cfg, num_experts=1, rank=6, alpha=12, seed=3, b_std=0.05)
    input_ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    got = runtime.forward(input_ids, "lora").logits

    merged = LDMoleRuntime(runtime.model)  # shares weights: restore them afterwards
    saved = {n: p.clone() for n, p in runtime.model.named_parameters()}
    try:
        scale = adapter.config.scaling
        with torch.no_grad():
            for layer_idx, layer in enumerate(runtime.model.layers):
                for fused, projs in ((layer.attn.qkv, ("q_proj", "k_proj", "v_proj")), (layer.attn.o, ("o_proj",)),
                                     (layer.mlp.gate_up, ("gate_proj", "up_proj")), (layer.mlp.down, ("down_proj",))):
                    row = 0
                    for proj in projs:
                        A = adapter.tensors[f"layers.{layer_idx}.{proj}.lora_A"][0]
                        B = adapter.tensors[f"layers.{layer_idx}.{proj}.lora_B"][0]
                        fused.weight[row:row + B.shape[0]] += scale * B @ A
                        row += B.shape[0]
        expected = merged.forward(input_ids).logits
    finally:
        with torch.no_grad():
            for n, p in runtime.model.named_parameters():
                p.copy_(saved[n])
    assert (got - expected).abs().max() <= 1e-4


def test_native_format_round_trip(runtime, tmp_path):
    adapter = new_adapter_set(runtime.cfg, num_experts=4, rank=2, seed=9, b_std=0.05, num_labels=3)
    adapter.save(tmp_path / "a")
    again = AdapterSet.load(tmp_path / "a")
    assert again.config == adapter.config
    assert again.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(again.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


def test_unload_keeps_other_sets_intact(runtime):
    input_ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(5))
    before = runtime.forward(input_ids, ["all", "soft"]).logits
    runtime.load_adapter("tmp", new_adapter_set(runtime.cfg, num_experts=2, rank=8, seed=11, b_std=0.05))
    runtime.unload_adapter("narrow")
    after = runtime.forward(input_ids, ["all", "soft"]).logits
    assert (before - after).abs().max() <= 1e-6
    runtime.load_adapter(
        "narrow",
        new_adapter_set(
            runtime.cfg,
            num_experts=3,
            rank=2,
            alpha=4,
            lambda_hidden=16,
            seed=2,
            b_std=0.05,
            target_modules=["q_proj", "v_proj", "down_proj"],
        ),
    )
    runtime.unload_adapter("tmp")
