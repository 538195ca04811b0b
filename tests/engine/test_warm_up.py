"""No Triton kernel variant is first needed inside a step: the engine compiles (warms up) every
variant its bank can launch at start-up and after each load or unload, between steps.

Without a GPU nothing is compiled (the kernels run in Triton's interpreter), so the test tracks what
a GPU would compile: each launch's specialisation by Triton's own binder for an sm_90 target (the
cache key a GPU's first launch of that variant would compile under), and the phase in which each
key is first seen."""

import pytest
from tiny_models import tiny_config, write_tiny_model

from ldmole_cli.kernel_compile import specialise
from ldmole_cli.kernel_launches import KERNELS, Launch
from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.engine.sampling_params import SamplingParams


@pytest.fixture
def runtime(tmp_path):
    path = write_tiny_model(tmp_path / "llama", tiny_config("llama", kv_heads=2))
    rt = LDMoleRuntime.from_pretrained(path)
    rt.load_adapter("a", new_adapter_set(rt.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=1, b_std=0.05))
    rt.load_adapter("b", new_adapter_set(rt.cfg, num_experts=3, rank=2, router="softmax", seed=2, b_std=0.05,
                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    return rt


class FirstSeen:
    """Wraps the Triton kernels: each launch's variant key, and the phase it was first launched in."""

    def __init__(self, monkeypatch):
        import importlib

        self.phase, self.first, self.launches = "start-up", {}, {}
        for module_name, name in KERNELS:
            module = importlib.import_module(module_name)
            monkeypatch.setattr(module, name, self._wrap(module_name, name, getattr(module, name)))

    def _wrap(self, module_name, name, kernel):
        seen = self

        class Tracked:
            def __init__(self):
                self.kernel = kernel

            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    key = specialise(Launch(module_name, name, tuple(grid), args, kwargs), None).key
                    seen.first.setdefault(key, seen.phase)
                    seen.launches[seen.phase] = seen.launches.get(seen.phase, 0) + 1
                    if not seen.phase.startswith("serving"):
                        return None  # a warm-up's outputs are thrown away; what it would compile is recorded
                    return kernel[grid](*args, **kwargs)
                return run
        return Tracked()

    def first_seen_in(self, phase):
        return [key for key, p in self.first.items() if p == phase]


def test_no_kernel_variant_is_first_launched_inside_a_step(runtime, monkeypatch):
    from ldmole_runtime.lora.ops import triton as triton_backend

    monkeypatch.setattr(triton_backend, "WARM_UP_INTERPRETED", True)  # what a GPU would compile, launched
    seen = FirstSeen(monkeypatch)
    # every other step samples routing (a capture: the STORE_SCALAR variants) and 3 tokens decode twice
    llm = LLM(runtime, lora_backend="triton", expert_sample_every=2, max_num_batched_tokens=64, block_size=4)
    prompts = [[5, 9, 11, 3, 7, 2], [4, 4, 8, 1, 6, 6, 2], [10, 3, 3, 9, 12]]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    seen.phase = "serving"
    llm.generate(prompts, params, adapter=["a", "b", None])
    assert seen.first_seen_in("start-up") and seen.launches["serving"] > 0
    assert seen.first_seen_in("serving") == []

    # a set with more experts (a new widest E) and a λ-free router: new variants, compiled by the load
    seen.phase = "load"
    llm.engine.load_adapter("c", new_adapter_set(runtime.cfg, num_experts=6, rank=8, router="threshold", seed=3,
                                                 b_std=0.05))
    seen.phase = "serving after the load"
    llm.generate(prompts, params, adapter=["c", "a", "c"])
    assert seen.first_seen_in("load") and seen.launches["serving after the load"] > 0
    assert seen.first_seen_in("serving after the load") == []

    # an unload shrinks the widest E back: warmed up again
    seen.phase = "unload"
    llm.engine.unload_adapter("c")
    seen.phase = "serving after the unload"
    llm.generate(prompts, params, adapter=["a", "b", "a"])
    assert seen.first_seen_in("serving after the unload") == []


def test_without_warm_up_a_step_would_compile(runtime, monkeypatch):
    """The check above can fail: with the warm-up switched off, the first step launches new variants."""
    from ldmole_runtime.lora.ops.triton import TritonBackend

    monkeypatch.setattr(TritonBackend, "warm_up", lambda self, bank: None)
    seen = FirstSeen(monkeypatch)
    llm = LLM(runtime, lora_backend="triton", max_num_batched_tokens=64, block_size=4)
    seen.phase = "serving"
    llm.generate([[5, 9, 11, 3]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), adapter=["a"])
    assert seen.first_seen_in("serving")
