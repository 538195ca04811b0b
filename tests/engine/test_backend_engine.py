"""The engine on the Triton backend (interpreted on CPU) and on the C kernel gives what it gives on
the torch reference: identical greedy tokens, logprobs within fp32 tolerance, for a continuous
batch that mixes adapter sets of different E and r, an E = 1 set and the bare base."""

import pytest
from tiny_models import tiny_config, write_tiny_model

from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("base") / "qwen3", tiny_config("qwen3", kv_heads=2))
    rt = LDMoleRuntime.from_pretrained(path)
    cfg = rt.cfg
    rt.load_adapter("wide", new_adapter_set(cfg, num_experts=5, rank=4, lambda_hidden=16, seed=1, b_std=0.1))
    rt.load_adapter("narrow", new_adapter_set(cfg, num_experts=3, rank=6, lambda_hidden=8, seed=2, b_std=0.1,
                                              target_modules=["q_proj", "v_proj", "down_proj"]))
    rt.load_adapter("lora", new_adapter_set(cfg, num_experts=1, rank=2, seed=3, b_std=0.1))
    return rt


def run(runtime, mode, **engine):
    llm = LLM(runtime, lora_backend=mode, max_num_batched_tokens=48, block_size=4, **engine)
    prompts = [[3 + (7 * i + 5 * j) % 290 for j in range(4 + 3 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    return llm.generate(prompts, params, adapter=["wide", "narrow", None, "lora", "wide", "narrow"])


@pytest.fixture(scope="module")
def reference(runtime):
    return run(runtime, "torch")


def test_triton_engine_outputs_equal_the_torch_reference(runtime, reference):
    assert_same(reference, run(runtime, "triton"))


def test_cpu_engine_outputs_equal_the_torch_reference(runtime, reference, monkeypatch):
    """The C kernel itself computes these outputs: without a compiler the backend would quietly fall
    back to the torch reference and compare it with itself."""
    from ldmole_runtime.lora.ops import cpu

    calls = []
    kernel = cpu.fused_segment
    monkeypatch.setattr(cpu, "fused_segment", lambda *a: calls.append(1) or kernel(*a))
    assert_same(reference, run(runtime, "cpu"))
    assert len(calls) > 0


def test_static_decode_steps_equal_the_torch_reference(runtime, reference, monkeypatch):
    """Decode steps through the static buffers a CUDA graph replays (run eagerly here): padded to
    a batch bucket, block tables padded to a width bucket, padding rows on a scratch block."""
    from ldmole_runtime.engine.decode_graphs import DecodeGraphs

    used = []
    original = DecodeGraphs.run

    def counted(self, *args):
        out = original(self, *args)
        used.append((len(args[0]), out is not None))
        return out

    monkeypatch.setattr(DecodeGraphs, "run", counted)
    assert_same(reference, run(runtime, "triton", decode_graphs="eager"))
    assert len(used) >= 4 and all(ok for _, ok in used)
    assert {n for n, _ in used} - {1, 2, 4, 8}  # some steps really were padded


def assert_same(reference, got):
    for ref, out in zip(reference, got, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for a, b in zip(out.outputs[0].logprobs, ref.outputs[0].logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-4
        for a, b in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-4
