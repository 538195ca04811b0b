"""A decode step's model forward makes no device→host sync, on every LoRA backend, and the
adapters add at most a budgeted number of ops per layer over the bare base.

The engine runs real requests (two adapter sets and the bare base in one batch); every model
forward is recorded under an op counter (tests/op_counter.py). Prefill forwards are recorded too
but not held to zero: only decode is captured in a CUDA graph.
"""

import pytest
from op_counter import OpCounter, count_cpu_kernel_calls, count_triton_launches
from tiny_models import two_set_runtime

from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.engine.sampling_params import SamplingParams

# Ops per decoder layer that the adapters may add to a decode step (two sets present), per backend.
# triton: 4 groups × (3 launches + views of the step's three work buffers: routing rows, p, h), whatever the
# number of sets, plus the three buffers once per step; cpu: one C call per group for every few-token set of
# the step (a decode step's), and no torch op; torch routes one set at a time.
OPS_PER_LAYER_BUDGET = {"triton": 40, "cpu": 4, "torch": 320}
GROUPS_PER_LAYER = 4  # qkv, o, gate_up, down


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return two_set_runtime(tmp_path_factory.mktemp("base"))


def recorded_forwards(runtime, backend, adapters, monkeypatch, routing=None, **engine):
    """Greedy-generate 3 tokens for 3 prompts; return [(tokens in the forward, OpCounter)] per forward."""
    records, current = [], [None]
    model = runtime.model
    inner = type(model).forward

    def counted_forward(input_ids, positions, ctx):
        counter = OpCounter()
        current[0] = counter
        try:
            with counter:
                return inner(model, input_ids, positions, ctx)
        finally:
            current[0] = None
            records.append((input_ids.numel(), counter))

    monkeypatch.setattr(model, "forward", counted_forward)
    with count_triton_launches(monkeypatch, current), count_cpu_kernel_calls(monkeypatch, current):
        llm = LLM(runtime, lora_backend=backend, enable_prefix_caching=False, **engine)
        prompts = [[5, 9, 11, 3, 7, 2], [4, 4, 8, 1, 6, 6, 2], [10, 3, 3, 9, 12]]
        llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, routing=routing),
                     adapter=adapters)
    return records


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_decode_forward_has_no_sync_and_holds_the_op_budget(runtime, backend, monkeypatch):
    adapted = recorded_forwards(runtime, backend, ["a", "b", None], monkeypatch)
    bare = recorded_forwards(runtime, backend, [None, None, None], monkeypatch)
    decode = [c for n, c in adapted if n == 3]
    bare_decode = [c for n, c in bare if n == 3]
    assert len(decode) == 2 and len(bare_decode) == 2  # tokens 2 and 3 of each request
    for counter in decode + bare_decode:
        assert counter.syncs == []
    added = (decode[0].ops - bare_decode[0].ops) / runtime.cfg.num_layers
    assert 0 < added <= OPS_PER_LAYER_BUDGET[backend], f"{backend}: {added:.1f} ops per layer added"


def test_static_decode_step_has_no_sync(runtime, monkeypatch):
    """The static-buffer step that a CUDA graph captures: 3 sequences padded to a bucket of 4."""
    records = recorded_forwards(runtime, "triton", ["a", "b", None], monkeypatch, decode_graphs="eager")
    decode = [c for n, c in records if n == 4]
    assert len(decode) == 2
    for counter in decode:
        assert counter.syncs == []


def test_triton_decode_launches_at_most_three_kernels_per_group(runtime, monkeypatch):
    """Routing, shrink, expand: nothing else goes to the device per adapted group (the work buffers
    are the step's, allocated once; no memset, no per-group allocation)."""
    adapted = recorded_forwards(runtime, "triton", ["a", "b", None], monkeypatch, expert_sample_every=0)
    bare = recorded_forwards(runtime, "triton", [None, None, None], monkeypatch, expert_sample_every=0)
    decode = [c for n, c in adapted if n == 3]
    bare_decode = [c for n, c in bare if n == 3]
    for step, base in zip(decode, bare_decode, strict=True):
        per_group = (step.launches - base.launches) / (runtime.cfg.num_layers * GROUPS_PER_LAYER)
        assert per_group == 3, f"{per_group} launches per adapted group"
        assert step.allocations - base.allocations == 3  # routing work rows, p and h: once for the whole step



@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_routing_on_request_adds_no_sync_to_the_forward(runtime, backend, monkeypatch):
    """Per-token routing for the API (`routing`): every projection writes into the step's tensor; the
    one read-back happens after the forward (tests/engine/test_routing_trace.py counts it)."""
    records = recorded_forwards(runtime, backend, ["a", "b", None], monkeypatch, routing="weights")
    decode = [c for n, c in records if n == 3]
    assert len(decode) == 2
    for counter in decode:
        assert counter.syncs == []
