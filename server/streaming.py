"""Serving one HTTP request from engine streams: SSE framing, merging the streams of several
prompts, and cancelling the work when the client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(stream index, item) from several async iterators as items arrive. An exception in one
    stream is re-raised here; leaving early (or being cancelled) closes every stream, which aborts
    the engine requests behind them."""
    if len(streams) == 1:  # the common case: no pump task and no extra queue hop per token
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # at once, not at garbage collection: this aborts the request
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request, work: Callable[[], Awaitable]):
    """Run work(); if the client disconnects first, cancel it (which aborts its engine requests
    and frees their KV blocks) and return None."""
    task = asyncio.ensure_future(work())

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


@dataclass
class Delta:
    """What one choice (a prompt's sample) adds since its last chunk."""
    prompt: int  # the stream (prompt) it belongs to
    output: object  # the choice's CompletionOutput so far
    first: bool  # its first chunk
    text: str
    token_ids: list[int]
    logprobs: list  # one entry (TokenLogprob or None) per new token
    routing: list  # one RoutingEntry per new token, when the request asked for routing (else empty)


async def deltas(streams: list[AsyncIterator], holdback: list[int], tracker, finals: list,
                 wanted: Callable[[Delta], bool], ready: Callable[[int, object], bool] = lambda i, out: True
                 ) -> AsyncIterator[Delta]:
    """The choices' increments as the engine streams them: the loop completions and chat share.
    While a choice runs, its last `holdback[prompt]` characters are kept back (a stop string could
    still cut them). A delta that is not `wanted` is held over into the next one. `finals` gets each
    prompt's latest output; the tracker sees every output and is told when all finished."""
    sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, sample) -> (tokens sent, characters sent)
    async for i, out in merge_streams(streams):
        tracker.observe(i, out)
        finals[i] = out
        if not ready(i, out):
            continue
        for c in out.outputs:
            key = (i, c.index)
            n_tok, n_chr = sent.get(key, (0, 0))
            text = c.text
            if c.finish_reason is None:
                text = text[:max(n_chr, len(text) - holdback[i])]
            ids = list(c.token_ids[n_tok:])
            entries = list(c.logprobs[n_tok:]) if c.logprobs is not None else [None] * len(ids)
            routing = list(c.routing[n_tok:]) if c.routing is not None else []
            delta = Delta(i, c, key not in sent, text[n_chr:], ids, entries, routing)
            if wanted(delta):
                sent[key] = (len(c.token_ids), len(text))
                yield delta
    tracker.finish()
