"""An asyncio front for LLMEngine, for the HTTP server: many concurrent callers, one engine loop.

The engine is not thread-safe, so only the loop touches it: callers' new requests and aborts are
queued and applied between steps, and each step runs in a worker thread so the event loop keeps
serving. Each request streams its outputs through its own asyncio.Queue.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ..errors import LDMoleError
from .llm_engine import LLMEngine, RequestOutput
from .sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._to_admit: list = []
        self._to_abort: list[str] = []
        self._controls: list = []  # (callable, future): engine changes that must happen between steps
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.errored: BaseException | None = None

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                       adapter: str | None = None, prompt_logprobs_from: int | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it, the last one finished.

        Bad input raises here, before anything is queued. Cancelling the iteration aborts the request.
        """
        if self.errored is not None:
            raise RuntimeError("the engine loop has stopped") from self.errored
        request = self.engine.prepare_request(request_id, prompt, params, adapter, prompt_logprobs_from)
        if request_id in self._queues or request_id in self.engine.requests:
            raise LDMoleError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._to_admit.append(request)
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine loop failed") from item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def call_between_steps(self, fn):
        """Run fn(engine) in the loop between two steps (e.g. loading or unloading an adapter set)."""
        future = asyncio.get_running_loop().create_future()
        self._controls.append((fn, future))
        self._ensure_loop()
        self._wake.set()
        return await future

    async def load_adapter(self, name: str, source) -> None:
        await self.call_between_steps(lambda engine: engine.load_adapter(name, source))

    async def unload_adapter(self, name: str) -> list[str]:
        return await self.call_between_steps(lambda engine: engine.unload_adapter(name))

    def abort(self, request_id: str) -> None:
        self._to_abort.append(request_id)
        self._wake.set()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                while self._controls:
                    fn, future = self._controls.pop(0)
                    try:
                        future.set_result(fn(engine))
                    except Exception as exc:  # a bad request to change the engine fails alone
                        future.set_exception(exc)
                while self._to_admit:
                    engine.admit(self._to_admit.pop(0))
                while self._to_abort:
                    engine.abort(self._to_abort.pop(0))
                if not engine.has_unfinished_requests():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                for out in await asyncio.to_thread(engine.step):
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
        except Exception as exc:  # keep callers from hanging: every waiter gets the failure
            self.errored = exc
            for queue in self._queues.values():
                queue.put_nowait(exc)
            raise

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
