"""POST /v1/score (multiple choice, on the engine's shared-context scoring) and POST /v1/classify."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from ldmole_server.completions import state_of
from ldmole_server.errors import APIError, classify_exception
from ldmole_server.protocol import ClassifyRequest, ScoreItem
from ldmole_server.routing import check_routing_budget, routing_object
from ldmole_server.state import ServerState, request_id
from ldmole_server.streaming import until_disconnected

router = APIRouter()


async def score_item(state: ServerState, item: ScoreItem, rid: str) -> dict:
    adapter = state.resolve_model(item.model)
    fmt = None if item.ldmole is None else item.ldmole.routing
    if fmt is not None:  # the choices' tokens are what routing is returned for
        check_routing_budget(1, sum([len(await state.engine.encode_async(c)) for c in item.choices]))
    tracker = state.metrics.tracker(state.label(adapter))
    try:
        result = await state.engine.score(rid, item.context, item.choices, adapter, fmt)
    except Exception as exc:
        tracker.fail(classify_exception(exc)[0])
        raise
    tracker.finish()
    choices = [{"index": i, "sum_logprob": c.sum_logprob, "mean_logprob": c.mean_logprob,
                "num_tokens": c.num_tokens, "is_greedy": c.is_greedy} for i, c in enumerate(result.choices)]
    if fmt is not None:
        for choice, entries in zip(choices, result.routing, strict=True):
            choice["ldmole"] = {"routing": routing_object(fmt, result.routing_info, entries)}
    return {
        "object": "score", "model": state.label(adapter), "choices": choices,
        "best": result.best, "best_normalized": result.best_normalized,
    }


@router.post("/v1/score")
async def score(body: ScoreItem | list[ScoreItem], raw: Request):
    """One item {model, context, choices} or a list of them. Per choice: summed and token-mean logprob,
    token count, greediness; per item the best choice under both."""
    state = state_of(raw)
    items = body if isinstance(body, list) else [body]
    if not items:
        raise APIError(400, "the list of score items is empty")
    limits = state.settings.limits
    limits.check("max_score_items", len(items), "the list of score items")
    limits.check_text([[item.context, item.choices] for item in items], param="context")
    for item in items:  # a limit or an unknown model fails the whole request before any work starts
        limits.check("max_score_choices", len(item.choices), "choices")
        state.resolve_model(item.model)
    # every choice runs as a sequence of its own (and each context as one more): all count against the queue
    state.engine.check_accepting(new=sum(len(item.choices) + 1 for item in items))
    rid = request_id("score")

    async def work():  # one item failing (say, the queue filled meanwhile) cancels the others' work
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(score_item(state, item, f"{rid}-{i}")) for i, item in enumerate(items)]
        except ExceptionGroup as failed:  # the first failure is the answer
            raise failed.exceptions[0] from None
        return [t.result() for t in tasks]

    results = await until_disconnected(raw, work)
    if results is None:
        return None
    if isinstance(body, list):
        return {"id": rid, "object": "list", "created": int(time.time()), "data": results}
    return {"id": rid, "created": int(time.time())} | results[0]


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, raw: Request):
    """Label index and class probabilities per input, from the adapter set's classification head."""
    state = state_of(raw)
    adapter = state.resolve_model(body.model)
    inputs = body.input
    if isinstance(inputs, str) or (inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not inputs:
        raise APIError(400, "input must not be empty", "input")
    state.settings.limits.check("max_classify_inputs", len(inputs), "input")
    state.settings.limits.check_text(inputs, param="input")
    ids = [await state.engine.encode_async(x) for x in inputs]
    probs = await until_disconnected(raw, lambda: state.engine.classify(ids, adapter))
    if probs is None:
        return None  # the client is gone: the inputs after the one running were never computed
    data = [{"index": i, "label": int(p.argmax()), "probs": p.tolist(), "num_classes": p.numel()}
            for i, p in enumerate(probs)]
    tokens = sum(len(x) for x in ids)
    return {"id": request_id("classify"), "object": "list", "created": int(time.time()), "model": state.label(adapter),
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
