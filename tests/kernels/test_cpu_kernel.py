"""The fused CPU kernel (kernels/cpu/ldmole_cpu.c) against its torch reference (the `torch` backend)."""

import pytest
import torch
from tiny_models import tiny_config

from ldmole_kernels.cpu_kernels import cpu_kernels
from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank
from ldmole_runtime.lora.capture import RoutingCapture
from ldmole_runtime.lora.ops.cpu import CpuBackend
from ldmole_runtime.lora.ops.torch_ref import TorchRefBackend
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.paths import default_cache_dir


def test_the_c_kernel_builds_here():
    """Every other test here would compare the torch fallback with itself were the kernel missing."""
    assert cpu_kernels(default_cache_dir() / "kernels") is not None, "the C kernel did not build: is gcc installed?"


def test_units_fit_the_kernel():
    """A unit longer than the C kernel's UNIT_TOKENS would be skipped there, leaving y without its delta."""
    from ldmole_runtime.lora.ops import cpu

    assert 1 <= cpu.UNIT_TOKENS <= cpu._library().ldmole_max_unit_tokens()


@pytest.fixture(scope="module")
def bank():
    cfg = ModelConfig.from_hf(tiny_config("qwen3", kv_heads=2))
    bank = AdapterBank(cfg)
    bank.add("big", new_adapter_set(cfg, num_experts=8, rank=4, lambda_hidden=16, seed=1, b_std=0.1))
    bank.add("part", new_adapter_set(cfg, num_experts=3, rank=6, lambda_hidden=8, seed=2, b_std=0.1,
                                     target_modules=["q_proj", "v_proj", "gate_proj"]))
    bank.add("soft", new_adapter_set(cfg, num_experts=4, rank=2, router="softmax", seed=3, b_std=0.1))
    bank.add("lora", new_adapter_set(cfg, num_experts=1, rank=3, seed=4, b_std=0.1))
    bank.add("dense", new_adapter_set(cfg, num_experts=5, rank=4, lambda_hidden=8, seed=5, b_std=0.1, lambda_bias=-30))
    return bank


def run_group(bank, gb, x, set_ids, use_kernel):
    y = torch.randn(x.shape[0], sum(gb.fan_outs), generator=torch.Generator().manual_seed(9))
    capture = RoutingCapture(x.shape[0], 8)
    ops = CpuBackend() if use_kernel else TorchRefBackend()
    with torch.inference_mode():
        ops.apply(y, x, bank, gb, AdapterBatch.build(set_ids, len(bank.slots)), capture)
    return y, capture


def assert_same(y_kernel, cap_kernel, y_torch, cap_torch):
    """The kernel's output and routing (p, its support, λ, which routers have a threshold) are the
    reference's."""
    assert (y_kernel - y_torch).abs().max() <= 1e-5
    assert cap_kernel.routing.keys() == cap_torch.routing.keys()
    for key in cap_torch.routing:
        assert (cap_kernel.routing[key] - cap_torch.routing[key]).abs().max() <= 1e-5
        assert torch.equal(cap_kernel.routing[key] > 0, cap_torch.routing[key] > 0)
        assert torch.allclose(cap_kernel.lambdas[key], cap_torch.lambdas[key], atol=1e-5, equal_nan=True)
        assert torch.equal(cap_kernel.thresholds[key].isnan(), cap_torch.thresholds[key].isnan())


@pytest.mark.parametrize("group", ["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("n", [1, 7, 40])
def test_kernel_matches_torch_reference(bank, group, n):
    gb = bank.group(1, group)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, gb.fan_in, generator=g)
    set_ids = torch.randint(-1, len(bank.slots), (n,), generator=g)
    y_kernel, cap_kernel = run_group(bank, gb, x, set_ids, use_kernel=True)
    y_torch, cap_torch = run_group(bank, gb, x, set_ids, use_kernel=False)
    assert_same(y_kernel, cap_kernel, y_torch, cap_torch)


def test_kernel_changes_only_adapted_rows(bank):
    gb = bank.group(0, "qkv")
    x = torch.randn(6, gb.fan_in)
    set_ids = torch.tensor([-1, 0, -1, 1, 2, -1])
    y_kernel, _ = run_group(bank, gb, x, set_ids, use_kernel=True)
    y_base = torch.randn(6, sum(gb.fan_outs), generator=torch.Generator().manual_seed(9))
    assert torch.equal(y_kernel[set_ids == -1], y_base[set_ids == -1])
    assert (y_kernel[set_ids >= 0] - y_base[set_ids >= 0]).abs().max() > 1e-3


class CountingLibrary:
    """The loaded C library, counting the calls of each entry point."""

    def __init__(self, lib):
        self.lib, self.calls = lib, {}

    def __getattr__(self, name):
        entry = getattr(self.lib, name)

        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return entry(*args)
        return call


@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
def test_a_step_of_few_token_sets_is_one_call_that_matches_the_reference(bank, group, monkeypatch):
    """Sets with up to UNIT_TOKENS tokens (every router kind, a partly adapted set, bare-base rows
    between them) go through one ldmole_group_units call that routes them itself; a set with more
    tokens gets its own call with BLAS routing. Both land where the torch reference does."""
    from ldmole_runtime.lora.ops import cpu

    counting = CountingLibrary(cpu._library())
    monkeypatch.setattr(cpu, "_library", lambda: counting)
    gb = bank.group(1, group)
    set_ids = torch.tensor([0, 0, -1, 1, 1, 1, 2, -1, 3, 3, 3, 3, 4, 0, 0, 0, 2])  # set 0: 5 tokens
    x = torch.randn(len(set_ids), gb.fan_in, generator=torch.Generator().manual_seed(3))
    y_kernel, cap_kernel = run_group(bank, gb, x, set_ids, use_kernel=True)
    assert counting.calls == {"ldmole_group_units": 1, "ldmole_group_decode": 1}
    y_torch, cap_torch = run_group(bank, gb, x, set_ids, use_kernel=False)
    assert_same(y_kernel, cap_kernel, y_torch, cap_torch)
