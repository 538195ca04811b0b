"""The C kernel's bf16 entry point, both builds of it (AVX512-BF16's dpbf16 where this CPU has it, and
the portable path that widens to fp32), against two references:

* routing: the torch backend on the same bf16 bank (λ-network in fp32, logits summed in fp32):
  the same p to 1e-5 and the same experts selected;
* the delta: fp32 arithmetic on the bf16 values of x, A and B under that p, written out here; the
  kernel sums in fp32 and rounds once into y, so it lands within one bf16 rounding of it.
"""

import pytest
import torch
from tiny_models import tiny_config

from ldmole_kernels.cpu_kernels import build_variant
from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.lora.adapter_batch import AdapterBatch
from ldmole_runtime.lora.bank import AdapterBank
from ldmole_runtime.lora.capture import RoutingCapture
from ldmole_runtime.lora.ops import cpu as cpu_ops
from ldmole_runtime.lora.ops.torch_ref import TorchRefBackend
from ldmole_runtime.model.config import ModelConfig


@pytest.fixture(scope="module")
def bank():
    cfg = ModelConfig.from_hf(tiny_config("qwen3", kv_heads=2, hidden_size=96))  # fan-ins past one 32-wide dpbf16
    bank = AdapterBank(cfg, dtype=torch.bfloat16)
    bank.add("big", new_adapter_set(cfg, num_experts=8, rank=4, lambda_hidden=16, seed=1, b_std=0.1))
    bank.add("part", new_adapter_set(cfg, num_experts=3, rank=6, lambda_hidden=8, seed=2, b_std=0.1,
                                     target_modules=["q_proj", "v_proj", "gate_proj"]))
    bank.add("soft", new_adapter_set(cfg, num_experts=4, rank=2, router="softmax", seed=3, b_std=0.1))
    bank.add("lora", new_adapter_set(cfg, num_experts=1, rank=3, seed=4, b_std=0.1))
    return bank


@pytest.fixture(scope="module", params=["dpbf16", "portable"])
def library(request, tmp_path_factory, monkeypatch_module):
    lib = build_variant(tmp_path_factory.mktemp("kernels"), portable_bf16=request.param == "portable")
    if request.param == "dpbf16" and not lib.ldmole_has_dpbf16():
        pytest.skip("this CPU has no AVX512-BF16: only the portable path exists here (tested beside)")
    monkeypatch_module.setattr(cpu_ops, "_library", lambda: lib)
    return lib


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def base_output(n, width):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)


def run(bank, gb, x, set_ids, backend):
    y = base_output(x.shape[0], sum(gb.fan_outs))
    capture = RoutingCapture(x.shape[0], 8)
    with torch.inference_mode():
        backend.apply(y, x, bank, gb, AdapterBatch.build(set_ids, len(bank.slots)), capture)
    return y, capture


def delta_in_fp32(bank, gb, x, set_ids, capture):
    """y0 + Σ_e p·(α/r)·B_e(A_e x), every operand widened to fp32, under the routing in `capture`."""
    y = base_output(x.shape[0], sum(gb.fan_outs)).float()
    for t, s in enumerate(set_ids.tolist()):
        if s < 0:
            continue
        slot = bank.at(s)
        for i, proj in enumerate(gb.projections):
            key = f"{gb.layer}.{proj}"
            if key not in capture.routing:
                continue
            for e in range(slot.num_experts):
                p = float(capture.routing[key][t, e])
                if p > 0:
                    A = gb.A[slot.offset + e, i, :slot.rank].float()
                    B = gb.B[i][slot.offset + e, :slot.rank].float()
                    y[t, gb.column_slices[i]] += p * slot.scaling * ((A @ x[t].float()) @ B)
    return y


def assert_kernel_matches(bank, gb, x, set_ids):
    """Routing as the torch backend's (p, support, λ) and the delta within one bf16 rounding of fp32
    arithmetic under it; returns the kernel's output. The tokens of a set past UNIT_SET_TOKENS_BF16
    get their λ hidden layer from oneDNN, which rounds it to bf16: their λ is held to 2e-3 only."""
    y_kernel, cap_kernel = run(bank, gb, x, set_ids, cpu_ops.CpuBackend())
    _, cap_torch = run(bank, gb, x, set_ids, TorchRefBackend())
    tokens_of_set = torch.bincount(set_ids + 1)[set_ids + 1]
    exact = (set_ids < 0) | (tokens_of_set <= cpu_ops.UNIT_SET_TOKENS_BF16)
    assert cap_kernel.routing.keys() == cap_torch.routing.keys()
    for key in cap_torch.routing:
        assert (cap_kernel.routing[key] - cap_torch.routing[key])[exact].abs().max() <= 1e-5
        assert torch.equal(cap_kernel.routing[key][exact] > 0, cap_torch.routing[key][exact] > 0)
        assert torch.allclose(cap_kernel.lambdas[key][exact], cap_torch.lambdas[key][exact], atol=1e-5,
                              equal_nan=True)
        assert torch.allclose(cap_kernel.lambdas[key], cap_torch.lambdas[key], atol=2e-3, equal_nan=True)
    expected = delta_in_fp32(bank, gb, x, set_ids, cap_kernel)
    error = (y_kernel.float() - expected).abs()
    assert (error <= expected.abs() * 2**-8 + 1e-6).all(), error.max()
    return y_kernel


@pytest.mark.parametrize("group", ["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("n", [1, 3, 9, 33, 70])  # random sets of ~n/5 tokens: one unit, several, or past the unit call
def test_bf16_kernel_against_the_torch_routing_and_fp32_arithmetic(bank, library, group, n):
    gb = bank.group(1, group)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, gb.fan_in, generator=g).to(torch.bfloat16)
    set_ids = torch.randint(-1, len(bank.slots), (n,), generator=g)
    set_ids[0] = 0
    if n > 2 * cpu_ops.UNIT_SET_TOKENS_BF16:
        set_ids[1:cpu_ops.UNIT_SET_TOKENS_BF16 + 2] = 1  # a set past the unit call
    seg = AdapterBatch.build(set_ids, len(bank.slots)).segments[0]
    with torch.inference_mode():  # the kernel runs, not the torch fallback
        assert cpu_ops.kernel_applies(x, x, seg, bank.at(seg.set_index), gb)
    y_kernel = assert_kernel_matches(bank, gb, x, set_ids)
    assert torch.equal(y_kernel[set_ids == -1], base_output(n, y_kernel.shape[1])[set_ids == -1])
    assert (y_kernel[set_ids >= 0].float() - base_output(n, y_kernel.shape[1])[set_ids >= 0].float()).abs().max() > 1e-3


@pytest.mark.parametrize("group", ["qkv", "down"])
def test_bf16_step_of_few_token_sets_in_one_call(bank, library, group):
    """Sets of one to twelve tokens and a set past UNIT_SET_TOKENS_BF16, with bare-base rows between
    them: the unit call routes the smaller sets itself (a set of twelve as several units, the λ layer
    shared among the threads), as the torch routing does, and mixes them within one bf16
    rounding of fp32 arithmetic; the big set takes its own call."""
    gb = bank.group(0, group)
    big = cpu_ops.UNIT_SET_TOKENS_BF16 + 3
    set_ids = torch.tensor([1, -1, 0, 0, 2, 2, 2, 2, 3, *[0] * (big - 2), -1, *[1] * 11, 2])
    x = torch.randn(len(set_ids), gb.fan_in, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    plan = cpu_ops.unit_plan(bank, AdapterBatch.build(set_ids, len(bank.slots)))
    assert plan.sets == {1, 2, 3}
    units = [tuple(plan.units[i:i + 3]) for i in range(0, len(plan.units), 3)]
    for s, tokens in ((1, 12), (2, 5), (3, 1)):  # each set's tokens, cut into units of UNIT_TOKENS
        counts = [n for slot, _, n in units if slot == s]
        assert sum(counts) == tokens and max(counts) <= cpu_ops.UNIT_TOKENS
    assert len(units) > 3
    assert_kernel_matches(bank, gb, x, set_ids)
