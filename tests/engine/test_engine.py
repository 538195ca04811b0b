"""Acceptance tests of the engine: continuous batching over many adapter sets with a paged KV cache."""

# Over 400 lines on purpose: the engine's behaviours against one brute-force reference and one
# module-scoped runtime (tiny model, three adapter sets), which every test here shares.

import random

import pytest
import torch
from tiny_models import tiny_config, write_tiny_model

from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
from ldmole_runtime.engine.sampling_params import SamplingParams

VOCAB = 300


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("base") / "qwen3", tiny_config("qwen3", kv_heads=2))
    rt = LDMoleRuntime.from_pretrained(path)
    rt.load_adapter("math", new_adapter_set(rt.cfg, num_experts=8, rank=4, lambda_hidden=16, seed=1, b_std=0.08))
    rt.load_adapter("code", new_adapter_set(rt.cfg, num_experts=3, rank=2, lambda_hidden=16, seed=2, b_std=0.08,
                                            target_modules=["k_proj", "v_proj", "up_proj"]))
    return rt


def random_prompts(n, seed, lo=2, hi=30):
    g = random.Random(seed)
    return [[g.randrange(3, VOCAB) for _ in range(g.randrange(lo, hi))] for _ in range(n)]


def greedy_reference(rt, prompt, adapter, max_tokens):
    """The full, non-cached forward of the runtime core, one request alone, token by token."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(rt.forward(torch.tensor([ids]), adapter).logits[0, -1].argmax()))
    return ids[len(prompt):]


def drain(engine):
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished, "a request finished twice"
                finished[out.request_id] = out
    return finished


def test_staggered_greedy_batching_matches_requests_run_alone(runtime):
    engine = LLMEngine(runtime, config=EngineConfig(block_size=4, num_blocks=96, max_num_batched_tokens=40))
    prompts = random_prompts(18, seed=0)
    adapters = [("math", "code", None)[i % 3] for i in range(18)]
    max_tokens = [3 + i % 6 for i in range(18)]
    finished, next_request = {}, 0
    while next_request < len(prompts) or engine.has_unfinished_requests():
        for _ in range(2 if next_request < len(prompts) else 0):  # two arrivals per step, while the batch runs
            i = next_request
            engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0,
                                                                   ignore_eos=True), adapter=adapters[i])
            next_request += 1
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished) == 18
    assert max(s for s in [engine.stats()["steps"]]) > 10
    for i in range(18):
        expected = greedy_reference(runtime, prompts[i], adapters[i], max_tokens[i])
        assert finished[f"r{i}"].outputs[0].token_ids == expected, f"request {i} ({adapters[i]})"


def test_prompt_logprobs_match_full_forward(runtime):
    llm = LLM(runtime, block_size=4, num_blocks=64, max_num_batched_tokens=16)  # long prompts are chunked
    prompts = random_prompts(6, seed=1, lo=5, hi=40)
    adapters = ["math", None, "code", "math", "code", None]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3), adapter=adapters)
    for prompt, adapter, out in zip(prompts, adapters, outs, strict=True):
        logprobs = torch.log_softmax(runtime.forward(torch.tensor([prompt]), adapter).logits[0], -1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for j in range(1, len(prompt)):
            entry = out.prompt_logprobs[j]
            assert entry.token_id == prompt[j]
            assert abs(entry.logprob - logprobs[j - 1, prompt[j]].item()) <= 1e-4
            top = torch.topk(logprobs[j - 1], 3)
            assert list(entry.top) == top.indices.tolist()


def test_score_ranks_like_brute_force(runtime):
    llm = LLM(runtime, block_size=4, num_blocks=64)
    g = random.Random(2)
    for adapter in ("math", "code", None):
        context = [g.randrange(3, VOCAB) for _ in range(11)]
        choices = [[g.randrange(3, VOCAB) for _ in range(g.randrange(1, 5))] for _ in range(4)]
        result = llm.score(context, choices, adapter=adapter)
        brute = []
        for c in choices:
            lp = torch.log_softmax(runtime.forward(torch.tensor([context + c]), adapter).logits[0], -1)
            brute.append(sum(lp[len(context) - 1 + t, tok].item() for t, tok in enumerate(c)))
        assert [abs(s.sum_logprob - b) <= 1e-4 for s, b in zip(result.choices, brute, strict=True)] == [True] * 4
        assert result.best == max(range(4), key=lambda i: brute[i])
    # the context's KV is computed once (11 tokens: two full blocks shared, the partial one copied),
    # and a choice's last token is only a target, never run
    engine = llm.engine
    context = [g.randrange(3, VOCAB) for _ in range(11)]  # new: no prefix-cache hit
    before = engine.stats()["computed_tokens"]
    llm.score(context, choices)
    assert engine.stats()["computed_tokens"] - before == len(context) + sum(len(c) - 1 for c in choices)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.held


@pytest.mark.parametrize("path", ["fork", "recompute"])
def test_score_many_matches_brute_force(runtime, path, monkeypatch):
    """Many items in one call: held contexts with one-token choices (read off the context), longer
    choices (forks whose last token is only a target), single-choice items (one plain request);
    and the fallback when no block is free for a fork's copy (the context is recomputed)."""
    llm = LLM(runtime, block_size=4, num_blocks=64)
    if path == "recompute":
        monkeypatch.setattr(llm.engine.block_manager, "fork", lambda *a, **k: False)
    g = random.Random(5)
    items = [([g.randrange(3, VOCAB) for _ in range(g.randrange(2, 12))],
              [[g.randrange(3, VOCAB) for _ in range(n)] for n in lengths])
             for lengths in ([1, 1, 3], [2, 1], [1], [4], [2, 2, 2, 1])]
    # a choice that is the context's greedy continuation, so is_greedy is True somewhere
    ctx = items[0][0]
    greedy = int(runtime.forward(torch.tensor([ctx]), "math").logits[0, -1].argmax())
    items[0][1].append([greedy])
    results = llm.score_many(items, adapter="math")
    for (context, choices), result in zip(items, results, strict=True):
        for c, got in zip(choices, result.choices, strict=True):
            lp = torch.log_softmax(runtime.forward(torch.tensor([context + c]), "math").logits[0], -1)
            rows = lp[len(context) - 1:len(context) - 1 + len(c)]
            assert got.sum_logprob == pytest.approx(sum(rows[t, tok].item() for t, tok in enumerate(c)), abs=1e-4)
            assert got.is_greedy == all(int(rows[t].argmax()) == tok for t, tok in enumerate(c))
            assert got.num_tokens == len(c)
    assert results[0].choices[-1].is_greedy
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks and not llm.engine.held


def test_prefix_cache_hits_only_under_the_same_adapter_set(runtime):
    engine = LLMEngine(runtime, config=EngineConfig(block_size=4, num_blocks=64))
    prompt = random_prompts(1, seed=3, lo=21, hi=22)[0]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)

    def run(rid, adapter):
        engine.add_request(rid, prompt, params, adapter=adapter)
        return drain(engine)[rid]

    first = run("a", "math")
    hits0 = engine.stats()["prefix_cache_hit_tokens"]
    second = run("b", "math")
    hits1 = engine.stats()["prefix_cache_hit_tokens"]
    assert hits1 - hits0 == 20 and second.num_cached_tokens == 20  # every full block but the last token's
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    for a, b in zip(first.outputs[0].logprobs, second.outputs[0].logprobs, strict=True):
        assert abs(a.logprob - b.logprob) <= 1e-5
    third = run("c", "code")
    fourth = run("d", None)
    assert engine.stats()["prefix_cache_hit_tokens"] == hits1
    assert third.num_cached_tokens == 0 and fourth.num_cached_tokens == 0
    assert third.outputs[0].token_ids == greedy_reference(runtime, prompt, "code", 4)


def test_no_leaks_under_random_load_with_aborts_and_preemptions(runtime):
    engine = LLMEngine(runtime, config=EngineConfig(block_size=4, num_blocks=24, max_num_seqs=12,
                                                    max_num_batched_tokens=48, max_model_len=64, check_blocks=True))
    g = random.Random(4)
    total_blocks = engine.block_manager.num_blocks
    cache_ptr = engine.runner.kv_cache.data_ptr()
    submitted, aborted, finished = set(), set(), {}
    step = 0
    while len(submitted) < 300 or engine.has_unfinished_requests():
        for _ in range(g.randrange(0, 4)):
            if len(submitted) < 300:
                rid = f"q{len(submitted)}"
                prompt = [g.randrange(3, VOCAB) for _ in range(g.randrange(1, 30))]
                params = SamplingParams(
                    max_tokens=g.randrange(1, 20), temperature=g.choice([0, 0.8]), seed=g.randrange(99)
                )
                engine.add_request(rid, prompt, params, adapter=g.choice(["math", "code", None]))
                submitted.add(rid)
        if submitted and g.random() < 0.1:
            rid = g.choice(sorted(submitted))
            engine.abort(rid)
            aborted.add(rid)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = out
        bm = engine.block_manager
        in_use = sum(1 for b in bm.blocks if b.ref_count > 0)
        assert in_use + bm.num_free_blocks == total_blocks
        step += 1
        assert step < 20000
    assert set(finished) == submitted  # nothing lost, nothing twice
    assert engine.stats()["preemptions"] > 0
    assert engine.block_manager.num_free_blocks == total_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    assert engine.runner.kv_cache.data_ptr() == cache_ptr and engine.block_manager.num_blocks == total_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests
    for rid, out in finished.items():
        reason = out.outputs[0].finish_reason
        assert reason in ("stop", "length", "abort")
        if rid not in aborted:
            assert reason != "abort"


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(runtime):
    prompt = random_prompts(1, seed=5)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = LLM(runtime, block_size=4, num_blocks=96).generate([prompt], params, adapter="math")[0]
    others = random_prompts(7, seed=6)
    batch = LLM(runtime, block_size=4, num_blocks=96).generate(
        others[:3] + [prompt] + others[3:],
        [SamplingParams(max_tokens=9, temperature=0.7, ignore_eos=True)] * 3 + [params]
        + [SamplingParams(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)] * 4,
        adapter=["code", None, "math", "math", None, "code", "math", None])
    assert batch[3].outputs[0].token_ids == alone.outputs[0].token_ids
    different = LLM(runtime, block_size=4, num_blocks=96).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True), adapter="math"
    )[0]
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


def test_async_engine_streams_and_aborts_on_cancel(runtime):
    import asyncio

    from ldmole_runtime.engine.async_engine import AsyncLLMEngine

    engine = LLMEngine(runtime, config=EngineConfig(block_size=4, num_blocks=64))
    aengine = AsyncLLMEngine(engine)
    prompts = random_prompts(4, seed=7)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def stream(i):
        seen = []
        async for out in aengine.generate(f"s{i}", prompts[i], params, adapter=["math", None, "code", "math"][i]):
            seen.append(list(out.outputs[0].token_ids))
            if i == 3 and len(seen) == 2:
                break  # the client goes away: the request must be aborted
        return seen

    async def main():
        results = await asyncio.gather(*(stream(i) for i in range(4)))
        for _ in range(100):  # let the loop apply the abort
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await aengine.shutdown()
        return results

    results = asyncio.run(main())
    for i in range(3):
        assert [len(s) for s in results[i]] == [1, 2, 3, 4, 5, 6]  # one new token per streamed output
        assert results[i][-1] == greedy_reference(runtime, prompts[i], ["math", None, "code"][i], 6)
    assert len(results[3]) == 2
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


class LetterTokenizer:
    """Token id t is one letter; enough to exercise stop strings and text output without a real tokenizer."""
    eos_token_id = 2

    def encode(self, text):
        return [3 + ord(ch) - ord("a") for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + (t - 3) % 26) for t in ids if not (skip_special_tokens and t < 3))


def test_stop_strings_stop_ids_min_tokens_and_generated_logprobs(runtime):
    engine = LLMEngine(runtime, LetterTokenizer(), EngineConfig(block_size=4, num_blocks=64))
    prompt = random_prompts(1, seed=8)[0]
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    engine.add_request("free", prompt, free, adapter="math")
    full = drain(engine)["free"].outputs[0]
    tokens = full.token_ids
    assert full.finish_reason == "length" and len(tokens) == 12
    assert full.text == LetterTokenizer().decode(tokens)

    # generated-token logprobs equal log_softmax of the full forward at each step
    for step, entry in enumerate(full.logprobs):
        lp = torch.log_softmax(runtime.forward(torch.tensor([prompt + tokens[:step]]), "math").logits[0, -1], -1)
        assert entry.token_id == tokens[step]
        assert abs(entry.logprob - lp[tokens[step]].item()) <= 1e-4
        assert list(entry.top) == torch.topk(lp, 3).indices.tolist()

    # a stop string made of generated letters ends the output just before it
    stop = full.text[5:7]
    engine.add_request("stop", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]),
                       adapter="math")
    out = drain(engine)["stop"].outputs[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(stop)]

    # a stop token id ends generation with that token; min_tokens holds it off
    engine.add_request("ids", prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[tokens[4]]),
                       adapter="math")
    out = drain(engine)["ids"].outputs[0]
    first = tokens.index(tokens[4])
    assert out.finish_reason == "stop" and out.token_ids == tokens[:first + 1]


def test_n_samples_share_the_prompt_and_are_reproducible(runtime):
    prompt = random_prompts(1, seed=9)[0]
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=42, ignore_eos=True)
    a = LLM(runtime, block_size=4, num_blocks=96).generate([prompt], params, adapter="code")[0]
    b = LLM(runtime, block_size=4, num_blocks=96).generate([prompt], params, adapter="code")[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3  # three different samples
    single = LLM(runtime, block_size=4, num_blocks=96).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=1.0, seed=42, ignore_eos=True), adapter="code")[0]
    assert single.outputs[0].token_ids == a.outputs[0].token_ids  # sample 0 uses the request's own seed


def test_bad_requests_are_refused_without_disturbing_the_batch(runtime):
    from ldmole_runtime.errors import LDMoleError

    engine = LLMEngine(runtime, config=EngineConfig(block_size=4, num_blocks=64, max_model_len=40))
    engine.add_request("ok", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), adapter="math")
    engine.step()
    for kwargs, message in [
        (dict(prompt=[5] * 40), "maximum is 39"),
        (dict(prompt=[]), "empty"),
        (dict(prompt=[5, VOCAB]), r"token ids must lie in \[0, 300\)"),
        (dict(prompt="text"), "need a tokenizer"),
        (dict(prompt=[5], adapter="nope"), "unknown adapter set 'nope'"),
        (dict(prompt=[5], request_id="ok"), "already in use"),
        (dict(prompt=[5], params=SamplingParams(stop=["x"])), "stop strings need a tokenizer"),
    ]:
        args = dict(request_id="bad", params=None, adapter=None) | kwargs
        with pytest.raises(LDMoleError, match=message):
            engine.add_request(args["request_id"], args["prompt"], args["params"], args["adapter"])
    done = drain(engine)
    assert list(done) == ["ok"] and len(done["ok"].outputs[0].token_ids) == 3


def test_unloading_a_set_aborts_its_requests_and_leaves_the_rest_intact(runtime):
    from ldmole_runtime.errors import LDMoleError

    extra = new_adapter_set(runtime.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=21, b_std=0.08)
    engine = LLMEngine(runtime, config=EngineConfig(block_size=4, num_blocks=96))
    engine.load_adapter("extra", extra)
    try:
        prompts = random_prompts(4, seed=10, lo=9, hi=12)
        adapters = ["extra", "math", None, "extra"]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
            engine.add_request(f"u{i}", p, params, adapter=a)
        engine.step()
        engine.step()
        assert sorted(engine.unload_adapter("extra")) == ["u0", "u3"]
        done = drain(engine)
        assert [done[f"u{i}"].outputs[0].finish_reason for i in range(4)] == ["abort", "length", "length", "abort"]
        for i in (1, 2):  # the other sets' requests continue exactly, though the bank was restacked
            assert done[f"u{i}"].outputs[0].token_ids == greedy_reference(runtime, prompts[i], adapters[i], 6)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        with pytest.raises(LDMoleError, match="unknown adapter set 'extra'"):
            engine.add_request("late", prompts[0], params, adapter="extra")

        # reloaded under the same name with other weights: the old cached prefix must not be served
        engine.load_adapter("extra", extra)
        engine.add_request("v0", prompts[0], params, adapter="extra")
        first = drain(engine)["v0"]
        engine.unload_adapter("extra")
        other = new_adapter_set(runtime.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=22, b_std=0.08)
        engine.load_adapter("extra", other)
        engine.add_request("v1", prompts[0], params, adapter="extra")
        second = drain(engine)["v1"]
        assert first.num_cached_tokens == 0 and second.num_cached_tokens == 0
        assert second.outputs[0].token_ids == greedy_reference(runtime, prompts[0], "extra", 6)
    finally:
        if "extra" in runtime.bank.names:
            runtime.unload_adapter("extra")


def test_async_engine_changes_adapters_between_steps(runtime):
    import asyncio

    from ldmole_runtime.engine.async_engine import AsyncLLMEngine
    from ldmole_runtime.errors import LDMoleError

    engine = LLMEngine(runtime, config=EngineConfig(block_size=4, num_blocks=64))
    aengine = AsyncLLMEngine(engine)
    extra = new_adapter_set(runtime.cfg, num_experts=2, rank=2, lambda_hidden=8, seed=31, b_std=0.08)

    async def main():
        await aengine.load_adapter("late", extra)
        outs = [o async for o in aengine.generate("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0,
                                                                               ignore_eos=True), adapter="late")]
        with pytest.raises(LDMoleError, match="unknown adapter set 'nope'"):
            await aengine.unload_adapter("nope")
        # unloading waits for the set's requests: one still running finishes normally, none is aborted
        stream = aengine.generate("b", [8, 9], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), "late")
        running = asyncio.ensure_future(_last(stream))
        await asyncio.sleep(0)
        await aengine.unload_adapter("late")
        assert running.done() and running.result().outputs[0].finish_reason == "length"
        await aengine.shutdown()
        return outs[-1]

    async def _last(stream):
        return [o async for o in stream][-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 3
    assert "late" not in runtime.bank.names


def test_block_manager_fork_shares_full_blocks_and_copies_the_partial_one():
    from ldmole_runtime.engine.block_manager import BlockManager
    from ldmole_runtime.engine.sequence import Sequence

    bm = BlockManager(num_blocks=4, block_size=4)
    params = SamplingParams(max_tokens=0)
    parent = Sequence("p", 0, list(range(10)), 10, None, "", params)
    assert bm.allocate(parent, 10)
    parent.num_computed_tokens = 10
    bm.commit(parent)
    copies = []
    child = Sequence("c", 0, list(range(12)), 12, None, "", params)
    assert bm.fork(parent, child, lambda src, dst: copies.append((src, dst)))
    assert child.block_table[:2] == parent.block_table[:2] and child.num_computed_tokens == 10
    assert copies == [(parent.block_table[2], child.block_table[2])]
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [2, 2, 1]
    other = Sequence("d", 0, list(range(12)), 12, None, "", params)
    assert not bm.fork(parent, other, lambda src, dst: copies.append((src, dst)))  # no block left to copy into
    assert other.block_table == [] and len(copies) == 1
    bm.release(parent)
    bm.release(child)
    assert bm.num_free_blocks == 4 and all(b.ref_count == 0 for b in bm.blocks)
