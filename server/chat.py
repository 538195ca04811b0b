"""POST /v1/chat/completions: the tokenizer's chat template, then the same engine path as completions."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ldmole_server.completions import Prompt, collect, sampling_params, state_of, stop_holdback, usage
from ldmole_server.errors import APIError, classify_exception, error_body
from ldmole_server.protocol import ChatCompletionRequest, ChatMessage
from ldmole_server.routing import check_routing_budget, routing_object
from ldmole_server.state import ServerState, request_id
from ldmole_server.streaming import SSE_DONE, deltas, sse

router = APIRouter()


async def chat_prompt(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True) -> Prompt:
    """The conversation through the chat template and the tokenizer, on a worker thread."""
    state.settings.limits.check_text(messages, param="messages")
    return await asyncio.to_thread(_chat_prompt, state, messages, add_generation_prompt)


def _chat_prompt(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool) -> Prompt:
    tok = state.engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
        raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from exc
    # the template already wrote the special tokens it wants
    return Prompt(tok.encode(text, add_special_tokens=False), text)


def chat_logprobs(state: ServerState, entries) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top.items()]}
                        for e in entries]}


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, raw: Request):
    state = state_of(raw)
    state.settings.limits.check_sampling(body)
    prompt = await chat_prompt(state, body.messages, body.add_generation_prompt)
    adapter = await state.pick_model(body.model, lambda: next(
        (m.text() for m in reversed(body.messages) if m.role == "user"), ""))
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.routing is not None:
        check_routing_budget(body.n, max_tokens)
    params = sampling_params(body, max_tokens, logprobs)
    rid = request_id("chatcmpl")
    [stream] = state.engine.generate_many(rid, [prompt.token_ids], [params], adapter)
    model = state.label(adapter)
    tracker = state.metrics.tracker(model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, rid, model, prompt, params, stream, tracker, include_usage, body.n),
                                 media_type="text/event-stream")
    finals = await collect(raw, [stream], tracker)
    if finals is None:
        return None
    out = finals[0]
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(state, c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": None}
               | _routing(body.routing, out, c.routing)
               for c in out.outputs]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage([prompt], finals)}


async def _stream(state: ServerState, rid: str, model: str, prompt: Prompt, params, stream, tracker,
                  include_usage: bool, n: int):
    created = int(time.time())

    def chunk(choices: list, **extra) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices} | extra)

    finals = [None]
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)])
        async for d in deltas([stream], [stop_holdback(params)], tracker, finals,
                              wanted=lambda d: bool(d.text or d.output.finish_reason)):
            logprobs = chat_logprobs(state, d.logprobs) if d.output.logprobs is not None else None
            yield chunk([{"index": d.output.index, "delta": {"content": d.text} if d.text else {},
                          "logprobs": logprobs, "finish_reason": d.output.finish_reason}
                         | _routing(params.routing, finals[0], d.routing)])
        if include_usage and finals[0] is not None:
            yield chunk([], usage=usage([prompt], finals))
    except Exception as exc:
        status, type_, message = classify_exception(exc)
        tracker.fail(status)
        yield sse(error_body(status, message, type_))
    yield SSE_DONE


def _routing(fmt: str | None, out, entries) -> dict:
    """A choice's `ldmole` field, when the request asked for routing (server/routing.py)."""
    if fmt is None:
        return {}
    return {"ldmole": {"routing": routing_object(fmt, out.routing_info, list(entries or []))}}
