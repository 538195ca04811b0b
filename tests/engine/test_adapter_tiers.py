"""Adapter sets beyond the device's slots: read from disk on demand, kept in host memory, evicted LRU.

Every output is held to an engine that keeps all its sets resident (the growable bank), so a set
that left its slot and came back must compute exactly what it computed before.
"""

import json

import pytest
from tiny_models import tiny_config, write_tiny_model

from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
from ldmole_runtime.engine.memory import reserve_for
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.errors import CheckpointError, LDMoleError, UnknownAdapterError

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    base = write_tiny_model(root / "base", tiny_config("qwen3", kv_heads=2))
    cfg = LDMoleRuntime.from_pretrained(base).cfg
    sets = root / "sets"
    for i, name in enumerate(NAMES):
        targets = None if name == "c" else ["q_proj", "v_proj"]  # c needs more of every slot: a new layout
        new_adapter_set(cfg, num_experts=4, rank=4, lambda_hidden=16, seed=i + 1, b_std=0.3,
                        target_modules=targets).save(sets / name)
    broken = sets / "broken"
    broken.mkdir()
    (broken / "ldmole_adapter.json").write_text(json.dumps({"num_experts": "many"}))
    (broken / "adapter.safetensors").write_bytes(b"not a safetensors file")
    return base, sets


def engine(model, **options) -> LLMEngine:
    base, sets = model
    config = EngineConfig(block_size=4, num_blocks=128, adapter_dir=str(sets), check_blocks=True, **options)
    return LLMEngine(LDMoleRuntime.from_pretrained(base), config=config)


GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
PROMPTS = {"a": [5, 9, 14, 3], "b": [7, 7, 21], "c": [30, 4, 4, 11, 2]}


def run(e: LLMEngine, requests: list[tuple[str, str, SamplingParams]]) -> dict[str, list[int]]:
    """Add every request at once, then step until all finish: request id -> output tokens."""
    for rid, name, params in requests:
        e.add_request(rid, PROMPTS.get(name, [1, 2, 3]), params, name)
    done = {}
    while e.has_unfinished_requests():
        for out in e.step():
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out.outputs[0].token_ids
    return done


@pytest.fixture(scope="module")
def reference(model):
    """Every set resident at once."""
    return run(engine(model), [(n, n, GREEDY) for n in NAMES])


def test_a_set_evicted_and_read_again_gives_identical_outputs(model, reference):
    e = engine(model, max_loras=1, max_cpu_loras=0)
    for i, name in enumerate(("a", "b", "c", "a")):  # one slot: each set evicts the one before it
        assert run(e, [(str(i), name, GREEDY)]) == {str(i): reference[name]}
    assert e.adapters.loads == {"disk": 4, "host": 0} and e.adapters.evictions == 3
    assert e.runtime.bank.layouts == 2  # "c" adapts every projection: the slots were laid out anew, once


def test_the_host_tier_saves_the_second_read(model, reference):
    e = engine(model, max_loras=1, max_cpu_loras=2)
    for i, name in enumerate(("a", "b", "a", "b")):
        assert run(e, [(str(i), name, GREEDY)]) == {str(i): reference[name]}
    assert e.adapters.loads == {"disk": 2, "host": 2}


def start_long_request_then_ask_for_b(e: LLMEngine) -> None:
    """A long request for "a" in the one slot, then a request for "b": once b's folder is read, "a" drains."""
    e.add_request("a-long", PROMPTS["a"], SamplingParams(max_tokens=100, temperature=0.0), "a")
    e.step()
    e.add_request("b", PROMPTS["b"], GREEDY, "b")
    while not e.adapters.resolve("a").draining:  # the read runs on a worker thread meanwhile
        e.step()
    assert e.requests["a-long"].seqs[0].output_ids and not e.adapters.resolve("b").draining


def test_a_step_holds_at_most_max_loras_sets_and_no_set_starves(model, reference):
    """With one slot, a long request for "a" runs while "b" waits; "a" then drains (its new requests
    wait too), so "b" gets the slot as soon as the first request is done, before a's second one."""
    e = engine(model, max_loras=1)
    seen_sets_per_step, order = [], []
    start_long_request_then_ask_for_b(e)
    e.add_request("a-again", PROMPTS["a"], GREEDY, "a")  # "a" is draining: this one waits as well
    while e.has_unfinished_requests():
        seen_sets_per_step.append({s.adapter for s in e.scheduler.running})
        for out in e.step():
            if out.finished:
                order.append(out.request_id)
                assert out.error is None
                if out.request_id != "a-long":
                    assert out.outputs[0].token_ids == reference[out.request_id[0]]
    assert order == ["a-long", "b", "a-again"]
    assert max(len(s - {None}) for s in seen_sets_per_step) == 1


def test_pinned_sets_are_never_evicted(model, reference):
    e = engine(model, max_loras=2, pinned_adapters=("a",))
    assert run(e, [("a", "a", GREEDY)]) == {"a": reference["a"]}
    for i, name in enumerate(("b", "c", "b", "c")):
        assert run(e, [(str(i), name, GREEDY)]) == {str(i): reference[name]}
        assert "a" in e.runtime.bank.names  # "a" was the least recently used, but the other slot took every eviction
    assert e.adapters.evictions == 3


def test_a_corrupt_folder_fails_only_its_own_requests(model, reference):
    e = engine(model, max_loras=1)
    e.add_request("bad", [1, 2, 3], GREEDY, "broken")
    e.add_request("good", PROMPTS["b"], GREEDY, "b")
    done, rejected = {}, []
    while e.has_unfinished_requests():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
        rejected += e.rejected
    assert [rid for rid, _ in rejected] == ["bad"] and isinstance(rejected[0][1], CheckpointError)
    assert "broken/ldmole_adapter.json" in str(rejected[0][1])  # the message names the file
    assert done["bad"].error is not None and done["good"].outputs[0].token_ids == reference["b"]
    # the folder is read again by the next request for it (it may have been fixed meanwhile)
    e.add_request("bad-again", [1, 2, 3], GREEDY, "broken")
    while e.has_unfinished_requests():
        e.step()
    assert e.adapters.loads["disk"] == 1


def test_unload_of_a_draining_set_and_loading_it_again(model, reference, tmp_path):
    base, sets = model
    e = engine(model, max_loras=1)
    start_long_request_then_ask_for_b(e)  # "a" is being evicted for "b"
    assert e.unload_adapter("a") == ["a-long"]
    done = run(e, [])
    assert done["b"] == reference["b"] and "a" not in e.adapters.handles
    # a set loaded by path is gone once unloaded (one of --adapter-dir is servable again while its folder is)
    e.load_adapter("elsewhere", e.runtime.bank.export("b").save(tmp_path / "copy-of-b"))
    e.unload_adapter("elsewhere")
    with pytest.raises(UnknownAdapterError):
        e.add_request("gone", PROMPTS["b"], GREEDY, "elsewhere")
    e.load_adapter("a", sets / "a")  # loaded again by path, while "b" holds the slot: it waits in host memory
    with pytest.raises(LDMoleError, match="already loaded"):
        e.load_adapter("a", sets / "a")
    assert run(e, [("a2", "a", GREEDY), ("b2", "b", GREEDY)]) == {"a2": reference["a"], "b2": reference["b"]}


def test_a_folder_added_after_start_is_servable(model, reference, tmp_path):
    e = engine(model, max_loras=2)
    with pytest.raises(UnknownAdapterError, match="'late'"):
        e.add_request("x", [1, 2], GREEDY, "late")
    base, sets = model
    new_adapter_set(e.runtime.cfg, num_experts=2, rank=2, lambda_hidden=8, seed=9, b_std=0.3).save(sets / "late")
    try:
        assert len(run(e, [("late", "late", GREEDY)])["late"]) == GREEDY.max_tokens
        assert "late" in e.runtime.bank.names
    finally:
        import shutil
        shutil.rmtree(sets / "late")


def test_a_memory_total_sizes_the_kv_cache_after_the_slots_and_the_host_cache(model):
    """--memory-gib: the KV cache gets what the base weights, the slots and the host cache leave. The
    slots are counted at the first folder's shape, and the bank that the sets then fill weighs that."""
    base, sets = model
    runtime = LDMoleRuntime.from_pretrained(base)
    reserve = reserve_for(runtime, max_loras=2, max_cpu_loras=3, adapter_dir=str(sets))
    cfg = runtime.cfg
    block_bytes = 2 * cfg.num_layers * 4 * cfg.num_kv_heads * cfg.head_dim * 4  # fp32, 4 tokens per block
    total = (reserve.total + 101.5 * block_bytes) / 2**30  # 100 blocks and the runner's scratch block
    e = LLMEngine(runtime, config=EngineConfig(block_size=4, memory_gib=total, adapter_dir=str(sets),
                                               max_loras=2, max_cpu_loras=3))
    assert e.block_manager.num_blocks == 100 and reserve.shaped_by == "the shape of a" and reserve.host_counted
    run(e, [("a", "a", GREEDY), ("b", "b", GREEDY)])
    assert runtime.bank.storage_bytes() == reserve.slots
    read = sum(t.numel() * t.element_size() for t in e.adapters.host["a"].tensors.values())
    assert read <= reserve.host / 5  # 3 in host memory, 2 read ahead
    with pytest.raises(LDMoleError, match="leaves nothing for the KV cache"):
        LLMEngine(LDMoleRuntime.from_pretrained(base), config=EngineConfig(
            block_size=4, memory_gib=reserve.total / 2**30 * 0.9, adapter_dir=str(sets), max_loras=2, max_cpu_loras=3))
