"""The Triton kernels stay inside their buffers, checked access by access (tests/bounds_checker.py),
on the banks that once made them read past one: a set adapting attention only (no λ-network for
the MLP's fan-in), two sets without any λ-network, sets of very different ranks, a block with a
single valid row, a set adapting one projection of a group; and each result equals the torch
reference. The interpreter never checks an address: without the checker these reads pass."""

import pytest
import torch
from bounds_checker import OutOfBounds, bounds_checked
from tiny_models import tiny_config

from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank
from ldmole_runtime.lora.capture import RoutingCapture
from ldmole_runtime.lora.ops.torch_ref import TorchRefBackend
from ldmole_runtime.lora.ops.triton import TritonBackend
from ldmole_runtime.model.config import ModelConfig

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
GROUPS = ("qkv", "o", "gate_up", "down")


def _sets(cfg):
    return {
        "attention_only": new_adapter_set(cfg, num_experts=4, rank=4, lambda_hidden=8, seed=1, b_std=0.1,
                                          target_modules=ATTENTION),
        "softmax": new_adapter_set(cfg, num_experts=4, rank=2, router="softmax", seed=2, b_std=0.1),
        "threshold": new_adapter_set(cfg, num_experts=5, rank=3, router="threshold", seed=3, b_std=0.1),
        "lora": new_adapter_set(cfg, num_experts=1, rank=5, seed=4, b_std=0.1),
        "rank2": new_adapter_set(cfg, num_experts=3, rank=2, lambda_hidden=8, seed=5, b_std=0.1),
        "rank32": new_adapter_set(cfg, num_experts=2, rank=32, lambda_hidden=8, seed=6, b_std=0.1),
        "v_only": new_adapter_set(cfg, num_experts=6, rank=4, lambda_hidden=8, seed=7, b_std=0.1,
                                  target_modules=["v_proj"]),
    }


# (sets in the bank, tokens in the step): each a bank shape that once read out of bounds or could
BANKS = {
    "attention_only": (["attention_only"], 5),
    "two_lambda_free": (["softmax", "threshold"], 9),
    "lambda_free_and_lora": (["lora", "softmax", "threshold"], 20),
    "mixed_ranks": (["rank2", "rank32"], 21),
    "one_valid_row": (["attention_only", "softmax"], 1),
    "one_projection": (["v_only", "softmax"], 17),
    # the bank stores only v of q/k/v: its one projection's columns start past q and k in the fused output
    "v_alone": (["v_only"], 7),
}


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.from_hf(tiny_config("qwen3", kv_heads=2))


def _bank(cfg, names):
    sets = _sets(cfg)
    bank = AdapterBank(cfg)
    for name in names:
        bank.add(name, sets[name])
    return bank


@torch.no_grad()  # with autograd on, the triton backend runs the differentiable reference
def _run(backend, bank, group, x, batch):
    gb = bank.group(1, group)
    y = torch.zeros(x.shape[0], gb.columns[-1] + gb.fan_outs[-1])
    capture = RoutingCapture(x.shape[0], 8)
    backend.apply(y, x, bank, gb, batch, capture)
    return y, capture


@pytest.mark.parametrize("case", sorted(BANKS))
def test_kernels_stay_in_bounds_and_match_the_reference(cfg, case):
    names, n = BANKS[case]
    bank = _bank(cfg, names)
    g = torch.Generator().manual_seed(len(case))
    set_ids = torch.arange(n) % (len(names) + 1) - 1 if n > 1 else torch.tensor([len(names) - 1])
    batch = AdapterBatch.build(set_ids, len(names))
    groups = [g for g in GROUPS if (1, g) in bank.groups]  # a group no set adapts has nothing in the bank
    with bounds_checked() as seen:
        for group in groups:
            x = torch.randn(n, bank.group(1, group).fan_in, generator=g)
            y, cap = _run(TritonBackend(), bank, group, x, batch)
            y_ref, cap_ref = _run(TorchRefBackend(), bank, group, x, batch)
            assert (y - y_ref).abs().max() <= 1e-5, (case, group)
            for key in cap_ref.routing:
                assert torch.equal(cap.routing[key] > 0, cap_ref.routing[key] > 0), (case, key)
    assert seen.launches >= 3 * len(groups) and seen.accesses > 0  # the checker really watched the kernels


def test_the_checker_catches_a_read_past_a_buffer():
    """The checker itself: a kernel that reads one element past its input is reported."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy(src, dst, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(dst + i, tl.load(src + i, mask=i < n + 1), mask=i < n)

    src, dst = torch.arange(8.0), torch.zeros(8)
    with bounds_checked():
        copy[(1,)](src, dst, 7, BLOCK=8)  # reads 8 of 8: in bounds
    with pytest.raises(OutOfBounds, match="load of 1 element"), bounds_checked():
        copy[(1,)](src[:7], dst, 7, BLOCK=8)  # reads the 8th element of a 7-element view


def _expert_work(bank, group, x, set_ids):
    """(A and B elements loaded, dot multiply-adds) of the shrink and expand kernels for one group."""
    from ldmole_kernels.triton.shrink_expand import shrink_expand
    from ldmole_runtime.lora.adapter_batch import TOKEN_BLOCK

    gb, t = bank.group(1, group), bank.kernel_tables()
    batch = AdapterBatch.build(set_ids, len(bank.slots))
    P = len(gb.projections)
    p = torch.zeros(x.shape[0], P, t.max_experts)
    p[:, :, :2] = 0.5  # both experts of every set active
    y = torch.zeros(x.shape[0], sum(gb.fan_outs))
    watch = {"A": gb.A} | {f"B{i}": b for i, b in enumerate(gb.B)}
    with bounds_checked(watch) as seen:
        shrink_expand(y, x, p, batch.sorted_tokens, batch.blocks, t.set_info, t.scaling, gb.A, gb.B, TOKEN_BLOCK)
    return sum(seen.loaded.values()), seen.multiply_adds, y


@pytest.mark.parametrize("group", GROUPS)
def test_a_set_works_at_its_own_rank_whatever_else_the_bank_holds(cfg, group):
    """A rank-8 set in a bank that also holds a rank-64 set loads the same A/B elements and does the
    same dot work as in a bank of rank-8 sets alone (the bank pads every set to its widest rank)."""
    r8 = dict(num_experts=2, rank=8, lambda_hidden=8, b_std=0.1)
    alone, mixed = AdapterBank(cfg), AdapterBank(cfg)
    alone.add("r8", new_adapter_set(cfg, seed=1, **r8))
    mixed.add("r8", new_adapter_set(cfg, seed=1, **r8))
    mixed.add("r64", new_adapter_set(cfg, num_experts=2, rank=64, lambda_hidden=8, seed=2, b_std=0.1))
    assert mixed.group(1, group).A.shape[2] == 64 and alone.group(1, group).A.shape[2] == 8
    x = torch.randn(20, alone.group(1, group).fan_in, generator=torch.Generator().manual_seed(3))
    set_ids = torch.zeros(20, dtype=torch.long)  # every token on the rank-8 set
    loaded_alone, work_alone, y_alone = _expert_work(alone, group, x, set_ids)
    loaded_mixed, work_mixed, y_mixed = _expert_work(mixed, group, x, set_ids)
    assert loaded_mixed == loaded_alone > 0
    assert work_mixed == work_alone > 0
    assert (y_mixed - y_alone).abs().max() <= 1e-5

