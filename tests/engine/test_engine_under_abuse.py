"""The engine under careless or hostile use: more score choices than the KV cache holds still finish
while others are served, a client that leaves while its context is being prefilled leaves no block
behind, every step keeps each used block owned by a live sequence, a reader that falls behind holds
one output, and a fault while placing one sequence fails its request alone."""

import asyncio
import random

import pytest
import torch
from tiny_models import tiny_config, write_tiny_model

from ldmole_runtime import LDMoleRuntime, new_adapter_set
from ldmole_runtime.engine.async_engine import AsyncLLMEngine
from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine
from ldmole_runtime.engine.sampling_params import SamplingParams

VOCAB = 300


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("base") / "qwen3", tiny_config("qwen3", kv_heads=2))
    rt = LDMoleRuntime.from_pretrained(path)
    rt.load_adapter("math", new_adapter_set(rt.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=1, b_std=0.08))
    return rt


def small_engine(runtime, num_blocks=32):
    return LLMEngine(runtime, config=EngineConfig(block_size=4, num_blocks=num_blocks, max_num_seqs=8,
                                                  max_num_batched_tokens=32, max_model_len=64, check_blocks=True))


def brute_force(rt, context, choice, adapter):
    lp = torch.log_softmax(rt.forward(torch.tensor([context + choice]), adapter).logits[0], -1)
    return sum(lp[len(context) - 1 + t, tok].item() for t, tok in enumerate(choice))


def test_more_forks_than_the_cache_holds_finish_while_others_are_served(runtime):
    """100 choices of 10 tokens after a 21-token context, with 32 blocks of 4: the forks queued at once
    took every free block for their copies, the head could not allocate, nothing ran (issue 22)."""
    engine = small_engine(runtime)
    aengine = AsyncLLMEngine(engine)
    g = random.Random(0)
    context = [g.randrange(3, VOCAB) for _ in range(21)]
    choices = [[g.randrange(3, VOCAB) for _ in range(10)] for _ in range(100)]
    other = [g.randrange(3, VOCAB) for _ in range(5)]

    async def generate():  # another client, arriving once the forks are queued
        while len(engine.scheduler.waiting) < 50:
            await asyncio.sleep(0.001)
        outputs = [out async for out in aengine.generate(
            "other", other, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))]
        return outputs[-1]

    async def main():
        scored, served = await asyncio.wait_for(
            asyncio.gather(aengine.score("big", context, choices, "math"), generate()), timeout=120)
        await aengine.shutdown()
        return scored, served

    scored, served = asyncio.run(main())
    assert served.finished and len(served.outputs[0].token_ids) == 4
    for i in (0, 37, 99):
        assert abs(scored.choices[i].sum_logprob - brute_force(runtime, context, choices[i], "math")) <= 1e-4
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.held
    assert engine.block_manager.ownership_errors([]) == []


def test_a_client_leaving_while_its_context_prefills_leaves_no_blocks(runtime):
    """The client goes away during the step that finishes its context: the abort used to find no
    request (the context had moved to the held ones), its blocks never came back, and unloading its
    adapter set waited for ever."""
    engine = small_engine(runtime)
    aengine = AsyncLLMEngine(engine)
    context = list(range(3, 3 + 45))  # two prefill chunks of at most 32 tokens
    inner_step = engine.step

    async def main():
        loop = asyncio.get_running_loop()
        task = loop.create_task(aengine.score("leaver", context, [[5, 6], [7, 8, 9]], "math"))

        def step():
            outputs = inner_step()
            if "leaver-context" in engine.held and not task.done():
                loop.call_soon_threadsafe(task.cancel)  # before the loop sees this step's outputs
            return outputs

        engine.step = step
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(aengine.unload_adapter("math"), timeout=30)
        await aengine.shutdown()

    try:
        asyncio.run(main())
    finally:
        if "math" not in runtime.bank.names:
            runtime.load_adapter("math", new_adapter_set(runtime.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=1,
                                                         b_std=0.08))
    assert not engine.held and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.block_manager.ownership_errors([]) == []


def test_the_block_check_finds_a_leaked_and_a_double_freed_block(runtime):
    engine = small_engine(runtime, num_blocks=16)
    engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.step()
    engine.check_blocks()  # a running sequence owns its blocks
    bm = engine.block_manager
    seq = engine.scheduler.running[0]
    bm._take(next(iter(bm.free)))  # a block nobody owns
    with pytest.raises(RuntimeError, match="ref_count 1, named by 0"):
        engine.check_blocks()
    leaked = next(b.block_id for b in bm.blocks if b.ref_count == 1 and b.block_id not in seq.block_table)
    bm.blocks[leaked].ref_count = 0
    bm.free[leaked] = None
    bm.free[seq.block_table[0]] = None  # freed while the sequence still names it
    with pytest.raises(RuntimeError, match="on the free list"):
        engine.step()


def test_a_reader_that_falls_behind_holds_one_output_and_is_cut_off_far_behind(runtime):
    """Outputs are cumulative: an unread one is replaced by the next, so a client that does not read
    holds one output, not a copy per step (which grew quadratically); far enough behind, the stream
    ends with a clear error and the request is aborted."""
    from ldmole_runtime.engine.async_engine import SlowReaderError

    engine = small_engine(runtime, num_blocks=64)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def slow_reader(aengine, rid):
        stream = aengine.generate(rid, [5, 6, 7], params)
        first = await anext(stream)
        while rid in engine.requests and not engine.requests[rid].finished_reported:
            await asyncio.sleep(0.01)  # the request runs on; nobody reads
        rest = [out async for out in stream]
        return first, rest

    async def main(max_unread):
        aengine = AsyncLLMEngine(engine, max_unread_tokens=max_unread)
        try:
            return await asyncio.wait_for(slow_reader(aengine, f"slow-{max_unread}"), timeout=60)
        finally:
            await aengine.shutdown()

    first, rest = asyncio.run(main(None))
    assert len(first.outputs[0].token_ids) == 1 and len(rest) == 1  # the rest arrives as one, finished output
    assert rest[0].finished and len(rest[0].outputs[0].token_ids) == 40
    with pytest.raises(SlowReaderError, match="not read"):
        asyncio.run(main(10))
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_fault_while_scheduling_one_request_fails_it_alone(runtime, monkeypatch):
    """An exception while the scheduler placed one sequence used to escape the step and fail every
    request in flight."""
    engine = small_engine(runtime, num_blocks=64)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"ok{i}", [5 + i, 6, 7], params)
    engine.add_request("poison", [9, 9, 9], params)
    allocate = engine.block_manager.allocate

    def faulty(seq, num_tokens):
        if seq.request_id == "poison":
            raise RuntimeError("injected fault placing a sequence")
        return allocate(seq, num_tokens)

    monkeypatch.setattr(engine.block_manager, "allocate", faulty)
    finished = {}
    while engine.has_unfinished_requests():
        finished |= {out.request_id: out for out in engine.step() if out.finished}
    assert "injected fault" in finished["poison"].error
    assert [finished[f"ok{i}"].outputs[0].finish_reason for i in range(3)] == ["length"] * 3
    assert all(finished[f"ok{i}"].error is None for i in range(3))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
