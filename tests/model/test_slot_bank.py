"""The slot bank: a load writes one slot, an unload frees it, and neither touches another set.

Load time is measured at 1 and at 500 sets loaded, in one process; resident bytes are read off the
bank's own tensors; a set unloaded and loaded again (into another slot) computes the same logits.
"""

import statistics
import time

import pytest
import torch
from tiny_models import tiny_config

from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.lora.bank import AdapterBank, NoFreeSlotError
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.model.decoder import DecoderModel
from ldmole_runtime.model.runtime import LDMoleRuntime

# the embedded default adapter's shape: q/v only, 8 experts of rank 4, a 64-wide λ-network
DEFAULT_SHAPE = dict(num_experts=8, rank=4, lambda_hidden=64, target_modules=["q_proj", "v_proj"], b_std=0.1)


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.from_hf(tiny_config("qwen3", kv_heads=2, hidden_size=128, intermediate_size=256,
                                           num_hidden_layers=4))


def _runtime(cfg, max_sets):
    torch.manual_seed(0)
    model = DecoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    rt = LDMoleRuntime(model)
    rt.bank = AdapterBank(cfg, max_sets=max_sets)
    return rt


def _tensor_bytes(adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.tensors.values())


@pytest.mark.parametrize("shape", [DEFAULT_SHAPE, dict(num_experts=4, rank=8, lambda_hidden=32, b_std=0.1)],
                         ids=["q_v_like_the_default_adapter", "every_projection"])
def test_a_set_takes_about_its_own_bytes(cfg, shape):
    bank = AdapterBank(cfg, max_sets=4)
    sets = [new_adapter_set(cfg, seed=i, **shape) for i in range(3)]
    for i, s in enumerate(sets):
        bank.add(f"s{i}", s)
    for i, s in enumerate(sets):
        ratio = bank.resident_bytes(f"s{i}") / _tensor_bytes(s)
        assert 1.0 <= ratio <= 1.1, ratio
    # and the bank holds nothing else: four slots' worth in all, whatever the groups a set leaves alone
    total = sum(t.numel() * t.element_size() for gb in bank.groups.values() for t in (gb.A, *gb.B))
    assert total <= 4 * _tensor_bytes(sets[0])


def test_load_time_does_not_grow_with_the_sets_loaded(cfg):
    rt = _runtime(cfg, max_sets=512)
    probe = new_adapter_set(cfg, seed=999, **DEFAULT_SHAPE)
    others = [new_adapter_set(cfg, seed=i, **DEFAULT_SHAPE) for i in range(4)]

    def load_time() -> float:
        times = []
        for _ in range(9):
            start = time.perf_counter()
            rt.load_adapter("probe", probe)
            times.append(time.perf_counter() - start)
            rt.unload_adapter("probe")
        return statistics.median(times)

    rt.load_adapter("set0", others[0])
    layouts = rt.bank.layouts
    at_one = load_time()
    for i in range(1, 500):
        rt.load_adapter(f"set{i}", others[i % len(others)])
    at_500 = load_time()
    assert len(rt.bank.slots) == 500 and rt.bank.layouts == layouts  # no set was copied meanwhile
    assert at_500 / at_one <= 1.5, (at_one, at_500)


def test_unload_then_load_again_gives_the_same_logits(cfg):
    rt = _runtime(cfg, max_sets=2)
    sets = {name: new_adapter_set(cfg, seed=i, **DEFAULT_SHAPE) for i, name in enumerate("abc")}
    rt.load_adapter("a", sets["a"])
    rt.load_adapter("b", sets["b"])
    ids = torch.randint(3, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    before = rt.forward(ids, ["a", "a"]).logits
    with pytest.raises(NoFreeSlotError, match="all 2 adapter slots are in use"):
        rt.load_adapter("c", sets["c"])
    rt.unload_adapter("a")
    rt.load_adapter("c", sets["c"])  # into a's old slot, over its numbers
    rt.unload_adapter("b")
    rt.load_adapter("a", sets["a"])  # into b's old slot
    assert rt.bank.index_of("a") == 1
    after = rt.forward(ids, ["a", "a"]).logits
    assert torch.equal(after, before)
    # the set that now sits in a's first slot computes its own numbers, not a's
    assert not torch.allclose(rt.forward(ids[:1], ["c"]).logits, before[:1])


def test_a_bigger_set_grows_the_slots_and_keeps_the_others(cfg):
    rt = _runtime(cfg, max_sets=3)
    small = new_adapter_set(cfg, seed=1, **DEFAULT_SHAPE)
    big = new_adapter_set(cfg, num_experts=6, rank=8, lambda_hidden=16, seed=2, b_std=0.1)  # every projection
    rt.load_adapter("small", small)
    ids = torch.randint(3, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    before = rt.forward(ids, "small").logits
    rt.load_adapter("big", big)
    assert rt.bank.layouts == 2 and rt.bank.geometry.rank == 8 and rt.bank.geometry.experts == 8
    assert torch.allclose(rt.forward(ids, "small").logits, before, atol=1e-6)
    assert torch.allclose(rt.bank.export("big").tensors["layers.1.down_proj.lora_A"],
                          big.tensors["layers.1.down_proj.lora_A"])
