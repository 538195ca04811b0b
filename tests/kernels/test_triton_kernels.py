"""Each Triton kernel against its torch reference (kernels/triton/), in fp32 on small shapes.

Without a GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1). The bank mixes
what one step can hold: sets of different E and r, sparsegen with a learned λ (one set dense
enough that tokens use every expert, one sparse enough that tokens use one), softmax, top-k,
AdaMoLE's threshold router, E = 1, a set adapting only some projections, and bare-base tokens.
"""

import pytest
import torch
from tiny_models import tiny_config

from ldmole_kernels.triton.routing import route_blocks
from ldmole_kernels.triton.shrink_expand import shrink_expand, shrink_expand_reference
from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.lora.adapter_batch import TOKEN_BLOCK, AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank
from ldmole_runtime.lora.ops.torch_ref import route_blocks_reference
from ldmole_runtime.lora.routing import SPARSEGEN_EPS
from ldmole_runtime.model.config import ModelConfig

SETS = ["wide", "part", "soft", "top", "lora", "all", "one", "ada"]


@pytest.fixture(scope="module")
def bank():
    cfg = ModelConfig.from_hf(tiny_config("qwen3", kv_heads=2))
    bank = AdapterBank(cfg)
    bank.add("wide", new_adapter_set(cfg, num_experts=8, rank=4, lambda_hidden=16, seed=1, b_std=0.1))
    bank.add("part", new_adapter_set(cfg, num_experts=3, rank=6, lambda_hidden=8, seed=2, b_std=0.1,
                                     target_modules=["q_proj", "v_proj", "gate_proj"]))
    bank.add("soft", new_adapter_set(cfg, num_experts=4, rank=2, router="softmax", seed=3, b_std=0.1))
    bank.add("top", new_adapter_set(cfg, num_experts=6, rank=3, router="topk", top_k=2, seed=4, b_std=0.1))
    bank.add("lora", new_adapter_set(cfg, num_experts=1, rank=5, seed=5, b_std=0.1))
    bank.add("all", new_adapter_set(cfg, num_experts=5, rank=4, lambda_hidden=8, seed=6, b_std=0.1, lambda_bias=-30))
    bank.add("one", new_adapter_set(cfg, num_experts=8, rank=2, lambda_hidden=8, seed=7, b_std=0.1, lambda_bias=30))
    bank.add("ada", new_adapter_set(cfg, num_experts=5, rank=3, router="threshold", seed=8, b_std=0.1))
    assert bank.names == SETS
    return bank


def step(bank, group, n, seed):
    gb = bank.group(1, group)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, gb.fan_in, generator=g)
    set_ids = torch.randint(-1, len(bank.slots), (n,), generator=g)
    return gb, x, set_ids, AdapterBatch.build(set_ids, len(bank.slots))


def route_both(bank, gb, x, batch):
    t = bank.kernel_tables()
    args = (x, batch.sorted_tokens, batch.blocks, t.set_info, t.masks[gb.group], gb.router,
            t.lambdas.get(gb.fan_in), (gb.threshold, gb.threshold_bias, t.threshold_cap), t.max_experts,
            SPARSEGEN_EPS, TOKEN_BLOCK)
    scalars, scalars_ref = (torch.full((x.shape[0], len(gb.projections)), float("nan")) for _ in range(2))
    return (route_blocks(*args, scalar_out=scalars), scalars,
            route_blocks_reference(*args, scalar_out=scalars_ref), scalars_ref)


# token counts below, at, and not a multiple of the block; a seed each
CASES = [("qkv", 37, 0), ("qkv", 1, 1), ("o", 16, 2), ("gate_up", 23, 3), ("down", 50, 4)]


@pytest.mark.parametrize("group,n,seed", CASES)
def test_routing_kernel_matches_reference(bank, group, n, seed):
    gb, x, set_ids, batch = step(bank, group, n, seed)
    p, lam, p_ref, lam_ref = route_both(bank, gb, x, batch)
    assert p.shape == (n, len(gb.projections), 8)
    routed = set_ids >= 0  # bare-base tokens' rows of p are not written (the expert kernels never read them)
    assert (p[routed] - p_ref[routed]).abs().max() <= 1e-5
    assert torch.equal(p[routed] > 0, p_ref[routed] > 0)  # the same experts are active
    assert torch.allclose(lam, lam_ref, atol=1e-5, equal_nan=True)
    assert (p_ref[~routed] == 0).all()


def test_routing_edge_cases_occur(bank):
    """The cases the kernels must get right are really in the batches above."""
    gb, x, set_ids, batch = step(bank, "qkv", 37, 0)
    p, *_ = route_both(bank, gb, x, batch)
    active = (p > 0).sum(-1)  # [n, P]
    sets = {name: set_ids == SETS.index(name) for name in SETS}
    assert (active[sets["all"]] == 5).all()  # every expert of the set
    assert (active[sets["one"]] == 1).all()  # a single expert
    assert (active[sets["top"]] == 2).all()
    assert (active[sets["lora"]] == 1).all()
    assert (active[sets["part"]][:, 1] == 0).all()  # k_proj is not adapted by "part"
    ada = active[sets["ada"]]
    assert ada.min() >= 1 and ada.min() < ada.max()  # AdaMoLE: a varying number above the threshold
    assert (set_ids == -1).any() and all(m.any() for m in sets.values())


@pytest.mark.parametrize("group,n,seed", CASES)
def test_shrink_expand_kernels_match_reference(bank, group, n, seed):
    gb, x, set_ids, batch = step(bank, group, n, seed)
    _, _, p, _ = route_both(bank, gb, x, batch)
    t = bank.kernel_tables()
    y0 = torch.randn(n, sum(gb.fan_outs), generator=torch.Generator().manual_seed(seed + 100))
    y, y_ref = y0.clone(), y0.clone()
    args = (x, p, batch.sorted_tokens, batch.blocks, t.set_info, t.scaling, gb.A, gb.B, TOKEN_BLOCK)
    shrink_expand(y, *args, block_n=16)
    shrink_expand_reference(y_ref, *args)
    assert (y - y_ref).abs().max() <= 1e-5
    base = set_ids == -1
    assert torch.equal(y[base], y0[base])  # bare-base rows untouched
    assert (y[~base] - y0[~base]).abs().max() > 1e-3


def test_inactive_experts_are_skipped(bank):
    """An expert that no token of a block routes to is never read: poisoning its weights with NaN
    changes nothing, while the reference (which reads every expert) turns NaN."""
    gb, x, set_ids, batch = step(bank, "o", 12, 5)
    p, *_ = route_both(bank, gb, x, batch)
    slot = bank.slots[SETS.index("one")]
    used = (p[set_ids == SETS.index("one"), 0, :slot.num_experts] > 0).any(0)
    assert not used.all()
    unused = slot.offset + int(torch.nonzero(~used)[0])
    t = bank.kernel_tables()
    A, B = gb.A.clone(), gb.B[0].clone()
    A[unused], B[unused] = float("nan"), float("nan")
    y = torch.zeros(12, gb.fan_outs[0])
    y_ref = y.clone()
    args = (x, p, batch.sorted_tokens, batch.blocks, t.set_info, t.scaling, A, [B], TOKEN_BLOCK)
    shrink_expand(y, *args, block_n=16)
    shrink_expand_reference(y_ref, *args)
    assert torch.isfinite(y).all() and not torch.isfinite(y_ref).all()
