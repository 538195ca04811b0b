"""POST /v1/completions, and the generation plumbing chat completions share with it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_server.errors import APIError, classify_exception, error_body
from ldmole_server.protocol import CompletionRequest, SamplingFields
from ldmole_server.routing import check_routing_budget, routing_object
from ldmole_server.state import ServerState, request_id
from ldmole_server.streaming import SSE_DONE, Delta, deltas, merge_streams, sse, until_disconnected

router = APIRouter()

# One request may not queue more sequences than this (prompts x n): a single body of a few KB must
# not be able to occupy the engine for minutes. lm-eval's batches stay far below it.
MAX_SEQUENCES_PER_REQUEST = 256


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # as the client sent it, if it sent text (for echo)


def state_of(raw: Request) -> ServerState:
    return raw.app.state.ldmole


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's SamplingParams from the request's fields (max_tokens None: up to the context
    limit); the engine checks them, with the prompt, in one place."""
    return SamplingParams(
        n=body.n, max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed, stop=body.stop or [], stop_token_ids=body.stop_token_ids or [],
        ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        min_tokens=body.min_tokens, logit_bias=body.logit_bias or {}, routing=body.routing)


async def completion_prompts(state: ServerState, prompt) -> list[Prompt]:
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt must not be empty", "prompt")
    prompts = []
    for item in items:
        ids = await state.engine.encode_async(item)
        if not ids:
            raise APIError(400, "prompt must not be empty", "prompt")
        prompts.append(Prompt(ids, item if isinstance(item, str) else None))
    return prompts


def stop_holdback(params: SamplingParams) -> int:
    """Characters a stream keeps back while running: text that a stop string could still cut off."""
    return max((len(s) for s in params.stop), default=1) - 1


def completion_logprobs(state: ServerState, token_ids: list[int], entries: list, offset: int) -> dict:
    """OpenAI's completion `logprobs` object for some tokens (entries: TokenLogprob or None per token)."""
    tokens = [state.token_text(t) for t in token_ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {state.token_text(k): v for k, v in e.top.items()} for e in entries],
        "text_offset": offsets,
    }


def usage(prompts: list[Prompt], finals) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in finals if out is not None)  # prompt tokens the prefix cache held
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(raw: Request, streams, tracker) -> list | None:
    """Every prompt's final output, or None if the client went away (its requests are aborted)."""
    async def work():
        finals = [None] * len(streams)
        async for i, out in merge_streams(streams):
            tracker.observe(i, out)
            finals[i] = out
        return finals

    try:
        finals = await until_disconnected(raw, work)
    except Exception as exc:
        tracker.fail(classify_exception(exc)[0])
        raise
    if finals is not None:
        tracker.finish()
    return finals


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw: Request):
    state = state_of(raw)
    state.settings.limits.check_sampling(body)
    state.settings.limits.check_text(body.prompt, param="prompt")
    prompts = await completion_prompts(state, body.prompt)
    adapter = await state.pick_model(body.model, lambda: _prompt_text(state, prompts[0]))  # "auto": the first prompt
    if isinstance(body.n, int) and len(prompts) * body.n > MAX_SEQUENCES_PER_REQUEST:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} sequences: at most {MAX_SEQUENCES_PER_REQUEST} "
                            "per request; split it", "prompt")
    if body.routing is not None:
        check_routing_budget(len(prompts) * body.n, body.max_tokens,
                             sum(len(p.token_ids) for p in prompts) * body.n if body.echo else 0)
    echo_logprobs = body.logprobs if body.echo else None
    if body.echo and body.routing is not None and echo_logprobs is None:
        echo_logprobs = 0  # the echoed prompt's routing comes with its scored positions
    params = [sampling_params(body, body.max_tokens, body.logprobs, echo_logprobs)] * len(prompts)
    rid = request_id("cmpl")
    streams = state.engine.generate_many(rid, [p.token_ids for p in prompts], params, adapter)
    model = state.label(adapter)
    tracker = state.metrics.tracker(model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, body, rid, model, prompts, params, streams, tracker, include_usage),
                                 media_type="text/event-stream")
    finals = await collect(raw, streams, tracker)
    if finals is None:
        return None  # the client is gone; nobody reads this
    choices = []
    for i, (prompt, out) in enumerate(zip(prompts, finals, strict=True)):
        prompt_text = _prompt_text(state, prompt) if body.echo else ""
        for c in out.outputs:
            logprobs = None
            if body.logprobs is not None:
                ids, entries = list(c.token_ids), list(c.logprobs or [])
                if body.echo:
                    ids, entries = prompt.token_ids + ids, list(out.prompt_logprobs) + entries
                logprobs = completion_logprobs(state, ids, entries, 0)
            choice = {"index": i * body.n + c.index, "text": prompt_text + c.text, "logprobs": logprobs,
                      "finish_reason": c.finish_reason, "stop_reason": None}
            if body.routing is not None:
                entries = (list(out.prompt_routing or []) if body.echo else []) + list(c.routing or [])
                choice["ldmole"] = {"routing": routing_object(body.routing, out.routing_info, entries)}
            choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompts, finals)}


def _prompt_text(state: ServerState, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else state.decode(prompt.token_ids)


async def _stream(state: ServerState, body: CompletionRequest, rid: str, model: str, prompts: list[Prompt],
                  params: list[SamplingParams], streams, tracker, include_usage: bool):
    created = int(time.time())
    finals = [None] * len(prompts)

    def echo_ready(i: int, out) -> bool:  # echoed prompt logprobs (and routing) come whole, with the first chunk
        return not (body.echo and params[i].prompt_logprobs is not None) or (
            out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompts[i].token_ids))

    def wanted(d: Delta) -> bool:
        return bool(d.text or d.token_ids or d.output.finish_reason or d.first)

    try:
        async for d in deltas(streams, [stop_holdback(p) for p in params], tracker, finals, wanted, echo_ready):
            prompt, out, text, ids, entries = prompts[d.prompt], finals[d.prompt], d.text, d.token_ids, d.logprobs
            if d.first and body.echo:
                text = _prompt_text(state, prompt) + text
                prompt_entries = out.prompt_logprobs or [None] * len(prompt.token_ids)
                ids, entries = prompt.token_ids + ids, list(prompt_entries) + entries
            logprobs = completion_logprobs(state, ids, entries, 0) if body.logprobs is not None else None
            choice = {"index": d.prompt * body.n + d.output.index, "text": text, "logprobs": logprobs,
                      "finish_reason": d.output.finish_reason, "stop_reason": None}
            if body.routing is not None:
                routed = (list(out.prompt_routing or []) if d.first and body.echo else []) + d.routing
                choice["ldmole"] = {"routing": routing_object(body.routing, out.routing_info, routed)}
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                       "choices": [choice]})
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": usage(prompts, finals)})
    except Exception as exc:
        status, type_, message = classify_exception(exc)
        tracker.fail(status)
        yield sse(error_body(status, message, type_))
    yield SSE_DONE
