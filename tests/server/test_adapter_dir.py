"""A server whose sets outnumber its slots: `--adapter-dir` with 50 sets behind `--max-loras 4
--max-cpu-loras 8`, hit concurrently. Every answer equals the same model with all 50 resident."""

import argparse
import concurrent.futures
import re

import httpx
import pytest
from live_server import BASE_NAME, LiveServer, offline_llm, wait_idle, write_model
from tiny_models import tiny_config

from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.model.config import ModelConfig
from ldmole_server.build import build_state, memory_split
from ldmole_server.launch import add_serve_flags

NUM_SETS = 50
PROMPTS = ("ab", "hello there")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-dir")
    base, _ = write_model(root)
    cfg = LDMoleRuntime.from_pretrained(base).cfg
    sets = root / "sets"
    for i in range(NUM_SETS):  # every 7th adapts every projection: the slots grow to fit it while serving
        targets = None if i % 7 == 3 else ["q_proj", "v_proj"]
        new_adapter_set(cfg, num_experts=4, rank=4, lambda_hidden=16, seed=100 + i, b_std=0.3,
                        target_modules=targets).save(sets / f"task-{i:03d}")
    (sets / "broken").mkdir()
    (sets / "broken" / "ldmole_adapter.json").write_text("{not json")
    (sets / "broken" / "adapter.safetensors").write_bytes(b"not safetensors either")
    other = ModelConfig.from_hf(tiny_config("llama", vocab_size=100, hidden_size=32))  # a set for another base
    new_adapter_set(other, num_experts=2, rank=2, lambda_hidden=8).save(sets / "other-base")
    return base, sets


@pytest.fixture(scope="module")
def reference(model):
    base, sets = model
    llm = offline_llm(base, {f"task-{i:03d}": sets / f"task-{i:03d}" for i in range(NUM_SETS)})
    jobs = [(f"task-{i:03d}", p) for i in range(NUM_SETS) for p in PROMPTS]
    outs = llm.generate([p for _, p in jobs], SamplingParams(max_tokens=6, temperature=0),
                        adapter=[name for name, _ in jobs])
    return {job: out.outputs[0].text for job, out in zip(jobs, outs, strict=True)}


@pytest.fixture(scope="module")
def server(model):
    base, sets = model
    options = dict(max_loras=4, max_cpu_loras=8, adapter_dir=str(sets))
    with LiveServer(base, {}, engine_options=options) as s:
        yield s


def complete(url: str, model: str, prompt: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 0}, timeout=120)


def test_fifty_sets_behind_four_slots_answer_concurrently_as_if_all_were_resident(server, reference):
    jobs = [(f"task-{i:03d}", p) for i in range(NUM_SETS) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda job: complete(server.url, *job), jobs))
    for (name, prompt), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference[(name, prompt)], name
    cache = server.engine.adapters
    assert sum(h.slot is not None for h in cache.handles.values()) <= 4 and len(server.engine.runtime.bank.slots) <= 4
    assert cache.loads["disk"] >= NUM_SETS and cache.evictions >= NUM_SETS - 4
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'ldmole:adapters\{tier="device"\} [1-4]\.0', metrics)
    assert re.search(r"ldmole:adapter_evictions_total [1-9]", metrics)
    assert 'ldmole:adapter_load_seconds_bucket{le="+Inf"}' in metrics
    assert re.search(r"ldmole:adapter_wait_seconds_count [1-9]", metrics)
    assert "task-" not in metrics.split("ldmole:adapters")[1].split("\n# ")[0]  # no per-set label on the tiers
    wait_idle(server)


def test_models_lists_every_set_with_its_tier(server):
    data = httpx.get(f"{server.url}/v1/models").json()["data"]
    tiers = {m["id"]: m.get("ldmole", {}).get("tier") for m in data}
    assert tiers[BASE_NAME] is None
    assert {f"task-{i:03d}" for i in range(NUM_SETS)} <= set(tiers)
    assert set(tiers.values()) - {None} <= {"device", "host", "disk"}


def test_a_broken_folder_fails_its_requests_alone_with_a_4xx(server, reference):
    r = complete(server.url, "broken", "ab")
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and message.startswith("broken/ldmole_adapter.json: "), r.text  # no server path
    r = complete(server.url, "other-base", "ab")
    assert r.status_code == 400 and "hidden size 32" in r.json()["error"]["message"], r.text
    r = complete(server.url, "task-001", "ab")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[("task-001", "ab")]
    assert complete(server.url, "no-such-set", "ab").status_code == 404
    wait_idle(server)


def test_memory_gib_gives_the_kv_cache_what_the_slots_and_the_host_cache_leave(model):
    base, sets = model
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    args = parser.parse_args(["--base", str(base), "--adapter-dir", str(sets), "--max-loras", "4",
                              "--max-cpu-loras", "8", "--memory-gib", "0.02"])
    engine = build_state(args).engine.engine
    kv = engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()
    block = kv // engine.block_manager.num_blocks
    assert 0.02 * 2**30 - block < engine.memory.total + kv <= 0.02 * 2**30
    assert engine.memory.slots > 0 and engine.memory.host > 0
    line = memory_split(engine)
    assert "sized by the shape of broken" not in line and "the shape of other-base" not in line
    assert f"({engine.block_manager.num_blocks} blocks)" in line and "task-000" in line, line
