"""Per-token routing in the engine's outputs (`SamplingParams.routing`), against the routing that a
plain forward over the same tokens records (what `ldmole forward` writes): two sets and the bare
base in one batch, every backend's numbers through the default one."""

import pytest
import torch
from tiny_models import two_set_runtime

from ldmole_runtime.adapters.spec import ALL_PROJECTIONS
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.engine.routing_trace import StepRouting
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.errors import LDMoleError

PROMPTS = [[5, 9, 11, 3, 7, 2, 8], [4, 4, 8, 1, 6, 6, 2, 9, 9, 10, 11, 12, 13, 14], [10, 3, 3]]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return two_set_runtime(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def outputs(runtime):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, routing="weights", prompt_logprobs=0)
    return LLM(runtime, enable_prefix_caching=False).generate(PROMPTS, params, adapter=["a", "b", None])


def oracle(runtime, tokens, adapter):
    out = runtime.forward(torch.tensor([tokens]), adapters=adapter, capture_routing=True)
    return {k: v[0] for k, v in out.routing.items()}, {k: v[0] for k, v in out.lambdas.items()}


def assert_entry_matches(entry, routing, lambdas, position, runtime):
    for layer in range(runtime.cfg.num_layers):
        for i, proj in enumerate(ALL_PROJECTIONS):
            key = f"{layer}.{proj}"
            if key not in routing:
                assert not entry.p[layer, i].any()
                assert entry.counts[layer, i] == 0
                continue
            want = routing[key][position]
            E = want.shape[0]
            assert (entry.p[layer, i, :E] - want).abs().max() <= 1e-5
            assert not entry.p[layer, i, E:].any()
            assert entry.counts[layer, i] == int((want > 0).sum())
            assert torch.allclose(entry.scalar[layer, i], lambdas[key][position], atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("which", [0, 1])
def test_generated_tokens_carry_the_routing_of_the_position_that_chose_them(runtime, outputs, which):
    out = outputs[which]
    prompt, generated = PROMPTS[which], out.outputs[0].token_ids
    routing, lambdas = oracle(runtime, prompt + generated, out.adapter)
    entries = out.outputs[0].routing
    assert len(entries) == len(generated) == 6
    for i, entry in enumerate(entries):
        assert_entry_matches(entry, routing, lambdas, len(prompt) + i - 1, runtime)
    assert out.prompt_routing[0] is None and len(out.prompt_routing) == len(prompt)
    for j in range(1, len(prompt)):
        assert_entry_matches(out.prompt_routing[j], routing, lambdas, j - 1, runtime)


def test_the_bare_base_has_no_routing_entries(outputs):
    assert outputs[2].outputs[0].routing == []


def test_routing_is_off_by_default_and_validated(runtime):
    out = LLM(runtime, enable_prefix_caching=False).generate(PROMPTS[:1], SamplingParams(max_tokens=2), adapter="a")
    assert out[0].outputs[0].routing is None and out[0].prompt_routing is None
    with pytest.raises(LDMoleError, match="routing"):
        SamplingParams(routing="all")


def test_one_read_back_per_step(runtime, monkeypatch):
    reads = []
    original = StepRouting.read
    monkeypatch.setattr(StepRouting, "read", lambda self, rows: reads.append(len(rows)) or original(self, rows))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, routing="counts")
    llm = LLM(runtime, enable_prefix_caching=False)
    llm.generate(PROMPTS, params, adapter=["a", "b", None])
    steps = llm.engine.scheduler.stats.steps
    assert 0 < len(reads) <= steps
    assert max(reads) == 2  # the two adapted sequences' rows, read together
