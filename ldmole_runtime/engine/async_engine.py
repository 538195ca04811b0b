"""An asyncio front for LLMEngine, and the server's one door to it: many concurrent callers, one
engine loop. The server asks it for everything (served sets, tokenizer, limits, admission) and
never reaches past it.

The engine is not thread-safe, so only the loop touches it: callers' new requests and aborts are
queued and applied between steps, and each step (and each control, such as loading an adapter set)
runs in a worker thread so the event loop keeps serving. Each request streams its outputs through
its own OutputMailbox (the newest output waits there; a reader far behind is cut off).

Nothing a request does can stop the loop: a request that fails admission (its adapter set was
unloaded after it was validated) fails alone; a step that raises fails only the requests in it
(LLMEngine.step); an error outside any step fails the requests in flight and the loop goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import torch

from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.engine.adapter_cache import AdapterHandle
from ldmole_runtime.engine.llm_engine import LLMEngine, RequestOutput
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.engine.scoring import ScoreResult, choice_routing, first_token_logprobs, score_choices
from ldmole_runtime.errors import EngineOverloadedError, LDMoleError, StepFailedError, UnknownAdapterError

logger = logging.getLogger("ldmole.engine")


# ---- a request's outputs on their way to its reader (OutputMailbox) ----------------------------------
# The engine reports a request's cumulative output after every step that advanced it. A reader that
# falls behind needs only the newest: an unread output is replaced by the next one, so a client that
# does not read holds one output (what it has not read), never a copy per step (vLLM merges deltas
# the same way). A failure or the finished output is never replaced. Past `max_unread_tokens` tokens
# generated and not read, the reader is cut off with a clear error and the request is aborted.


class SlowReaderError(LDMoleError):
    """The client read its stream too slowly: its request was aborted."""


def _tokens(item) -> int:
    return sum(len(c.token_ids) for c in item.outputs)


class OutputMailbox:
    def __init__(self, max_unread_tokens: int | None = None):
        self.max_unread_tokens = max_unread_tokens
        self.item = None
        self.taken_tokens = 0  # tokens in the last output the reader took
        self.ready = asyncio.Event()

    def put(self, item) -> bool:
        """Leave `item` for the reader; False if the reader is now too far behind (it gets an error)."""
        if self.item is not None and (isinstance(self.item, BaseException) or self.item.finished):
            return True  # the last word is already there
        if (self.max_unread_tokens is not None and not isinstance(item, BaseException)
                and self.item is not None and _tokens(item) - self.taken_tokens > self.max_unread_tokens):
            item = SlowReaderError(f"the stream was not read: over {self.max_unread_tokens} tokens waited "
                                   "unread, so the request was aborted")
            self.item = item
            self.ready.set()
            return False
        self.item = item
        self.ready.set()
        return True

    async def get(self):
        while self.item is None:
            self.ready.clear()
            await self.ready.wait()
        item, self.item = self.item, None
        if not isinstance(item, BaseException):
            self.taken_tokens = _tokens(item)
        return item


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None,
                 executor: concurrent.futures.Executor | None = None, max_unread_tokens: int | None = 8192):
        self.engine = engine
        self.max_queue = max_queue  # waiting requests beyond which new ones are refused (None: no limit)
        self.draining = False  # set at shutdown: new requests are refused, running ones finish
        self.unloading: set[str] = set()  # adapter sets waiting for their requests to finish before unloading
        self._queues: dict[str, OutputMailbox] = {}
        self.max_unread_tokens = max_unread_tokens  # a stream's reader this far behind is cut off
        self._to_admit: deque = deque()
        self._to_abort: deque[str] = deque()
        self._controls: deque = deque()  # (callable, future): engine changes that must happen between steps
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        # every step and control runs on one thread: the engine is used from a single thread, and
        # torch/OpenMP keep one thread team. `ldmole serve` passes a MainThreadExecutor (faster).
        self._worker = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ldmole-engine", initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),))
        self.errored: BaseException | None = None
        self.last_progress = time.monotonic()  # when the loop last finished a step or a control

    def stalled_for(self) -> float:
        """Seconds that work has been waiting with no step or control finishing (0 when idle or moving)."""
        busy = bool(self._to_admit or self._controls) or self.engine.has_unfinished_requests()
        return max(0.0, time.monotonic() - self.last_progress) if busy else 0.0

    # ---- what a caller needs to know: sets, text, limits -------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.runtime.cfg.vocab_size

    def adapter_names(self, include_unloading: bool = False) -> list[str]:
        """The servable sets that take new requests (or every servable set), whatever their tier."""
        return [n for n in list(self.engine.adapters.handles) if include_unloading or n not in self.unloading]

    def adapter_tiers(self) -> dict[str, str]:
        """Each servable set's tier: "device" (in a slot), "host" (read, in memory) or "disk"."""
        cache = self.engine.adapters
        return {name: cache.tier(h) for name, h in list(cache.handles.items())}

    def resolve_adapter(self, name: str | None) -> AdapterHandle | None:
        """The set a request names, resolved once; the handle travels with the request (None: the base)."""
        if name is not None and name in self.unloading:
            raise UnknownAdapterError(f"adapter set {name!r} is being unloaded")
        return self.engine.resolve_adapter(name)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids: text through the tokenizer (the one place), or ids checked as given."""
        return self.engine.encode(prompt)

    async def encode_async(self, prompt: str | list[int]) -> list[int]:
        """`encode`, with text tokenised on a worker thread (the tokenizer lets go of the GIL), so a long
        prompt never stalls the event loop."""
        if isinstance(prompt, str):
            return await asyncio.to_thread(self.engine.encode, prompt)
        return self.engine.encode(prompt)

    def stats(self) -> dict:
        """The engine's counters, with requests not yet admitted to the engine counted as waiting."""
        return self.engine.stats() | {"waiting": self.num_waiting}

    @property
    def expert_histogram(self):
        return self.engine.expert_histogram

    # ---- requests -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._to_admit) + len(self.engine.scheduler.waiting) + self.engine.num_pending

    def check_accepting(self, adapter: str | AdapterHandle | None = None, new: int = 1) -> None:
        """Refuse work the engine cannot take now: `new` sequences (a request's prompts x n, or a score's
        context and choices), counted against max_queue when they are created."""
        name = adapter.name if isinstance(adapter, AdapterHandle) else adapter
        if name is not None and name in self.unloading:
            raise UnknownAdapterError(f"adapter set {name!r} is being unloaded")
        if self.errored is not None:
            raise RuntimeError("the engine loop has stopped") from self.errored
        if self.draining:
            raise EngineOverloadedError("the server is shutting down and accepts no new requests")
        if self.max_queue is not None and 0 < self.max_queue < new:
            raise LDMoleError(f"the request makes {new} sequences; the queue holds at most {self.max_queue} "
                              "(`ldmole serve --max-queue`): split it")
        if self.max_queue is not None and self.num_waiting + new > self.max_queue:
            raise EngineOverloadedError(f"the queue is full ({self.num_waiting} sequences waiting, this request "
                                        f"adds {new}); retry later")

    def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                 adapter: str | None = None, prompt_logprobs_from: int | None = None) -> AsyncIterator[RequestOutput]:
        """An async iterator of the request's cumulative output after every step that advanced it,
        the last one finished.

        Bad input raises here, at the call, before anything is queued (so a server can still answer
        with an error status). Iterating queues the request; leaving the iteration early aborts it.
        A request that fails inside the engine raises StepFailedError (or its LDMoleError at admission).
        """
        self.check_accepting(adapter)
        request = self.engine.prepare_request(request_id, prompt, params, adapter, prompt_logprobs_from)
        return self._stream(request)

    def generate_many(self, request_id: str, prompts: list[list[int]], params: list[SamplingParams],
                      adapter: AdapterHandle | None) -> list[AsyncIterator[RequestOutput]]:
        """One HTTP request's prompts (`{request_id}-{i}`), under the API's limits: admission is checked
        once and every prompt is validated before any is queued, so a request is refused whole."""
        self.check_accepting(adapter, new=sum(p.n for p in params))
        requests = [self.engine.prepare_request(f"{request_id}-{i}", ids, p, adapter, serving_limits=True)
                    for i, (ids, p) in enumerate(zip(prompts, params, strict=True))]
        return [self._stream(r) for r in requests]

    async def _stream(self, request) -> AsyncIterator[RequestOutput]:
        rid = request.request_id
        queue = self._register(rid)
        self._to_admit.append(request)
        self._kick()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                finished = isinstance(item, BaseException) or item.finished
                yield _checked(item)
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def _register(self, request_id: str) -> OutputMailbox:
        if request_id in self._queues or request_id in self.engine.requests:
            raise LDMoleError(f"request id {request_id!r} is already in use")
        queue = OutputMailbox(self.max_unread_tokens)
        self._queues[request_id] = queue
        return queue

    def abort(self, request_id: str) -> None:
        self._to_abort.append(request_id)
        self._kick()

    # ---- scoring ----------------------------------------------------------------------------------
    async def score(self, request_id: str, context: str | list[int], choices: list[str | list[int]],
                    adapter: str | AdapterHandle | None = None, routing: str | None = None) -> ScoreResult:
        """LLM.score for many concurrent callers: the context is prefilled once and every choice forks it.
        `routing` ("counts" or "weights"): the result also carries each choice token's routing."""
        self.check_accepting(adapter, new=len(choices) + 1)
        engine = self.engine
        ctx_ids = await self.encode_async(context)
        choice_ids = [await self.encode_async(c) for c in choices]
        if not ctx_ids or not choice_ids or any(not c for c in choice_ids):
            raise LDMoleError("score needs a non-empty context and at least one non-empty choice")
        for c in choice_ids:  # the forks are validated now, not inside the loop
            engine.prepare_request("check", ctx_ids + c, SamplingParams(max_tokens=0), adapter)
        ctx_id = f"{request_id}-context"
        async for _ in self._stream(engine.prepare_context(ctx_id, ctx_ids, adapter, routing)):
            pass
        ids = [f"{request_id}-{i}" for i in range(len(choice_ids))]
        queues = [self._register(rid) for rid in ids]

        def fork_all(engine: LLMEngine):
            try:
                first = first_token_logprobs(engine.context_logprobs(ctx_id), choice_ids)
                forks = [engine.fork_or_recompute(ctx_id, rid, c, routing=routing)
                         for rid, c in zip(ids, choice_ids, strict=True)]
                return first, forks, engine.context_routing(ctx_id)
            finally:
                engine.release_context(ctx_id)

        done: set[str] = set()
        try:
            first, forked, (first_routing, routing_info) = await self.call_between_steps(fork_all)
            outputs = []
            for rid, queue in zip(ids, queues, strict=True):
                outputs.append(await _final(queue))
                done.add(rid)
        finally:
            for rid in ids:
                self._queues.pop(rid, None)
                if rid not in done:
                    self.abort(rid)
        result = score_choices(len(ctx_ids), first, choice_ids, outputs, forked)
        if routing is not None:
            result.routing = choice_routing(len(ctx_ids), first_routing, outputs, forked)
            result.routing_info = routing_info
        return result

    # ---- between steps ------------------------------------------------------------------------------
    async def call_between_steps(self, fn):
        """Run fn(engine) in a worker thread between two steps (loading or unloading an adapter set,
        a classification forward): no step runs meanwhile, and the event loop keeps serving."""
        future = asyncio.get_running_loop().create_future()
        self._controls.append((fn, future))
        self._kick()
        return await future

    async def load_adapter(self, name: str, source) -> None:
        adapter = source if isinstance(source, AdapterSet) else await asyncio.to_thread(AdapterSet.load, source)
        await self.call_between_steps(lambda engine: engine.load_adapter(name, adapter))

    async def unload_adapter(self, name: str, poll_s: float = 0.02) -> None:
        """Unload a set once its requests have finished. From the call on, new requests for it are
        refused (unknown adapter); the ones already accepted run to completion, never aborted."""
        self.engine.adapters.resolve(name)  # unknown: a clear error now
        if name in self.unloading:
            raise UnknownAdapterError(f"adapter set {name!r} is already being unloaded")
        self.unloading.add(name)
        try:
            while self._in_flight(name):
                await asyncio.sleep(poll_s)
            await self.call_between_steps(lambda engine: engine.unload_adapter(name))
        finally:
            self.unloading.discard(name)

    def _in_flight(self, adapter: str) -> bool:
        # list(...) copies in one step: a step in the worker thread may change these dicts meanwhile
        return (any(r.adapter == adapter for r in list(self._to_admit))
                or any(r.adapter == adapter for r in list(self.engine.requests.values()))
                or any(s.adapter == adapter for s in list(self.engine.held.values())))

    async def classify(self, inputs: list[str | list[int]], adapter: str | AdapterHandle | None) -> list[torch.Tensor]:
        """Class probabilities [num_labels] per input (text or token ids), from the adapter set's (or
        the base's) score head. One forward per input, each between two engine steps: generation goes
        on meanwhile, and a caller that leaves (is cancelled) stops the rest."""
        self.check_accepting(adapter, new=len(inputs))
        ids = [await self.encode_async(x) for x in inputs]
        if any(not x for x in ids):
            raise LDMoleError("inputs to classify must not be empty")
        return [await self.call_between_steps(lambda engine, x=x: engine.classify(x, adapter)) for x in ids]

    # ---- the loop -----------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _deliver(self, request_id: str, item) -> None:
        queue = self._queues.get(request_id)
        if queue is not None and not queue.put(item):
            self.abort(request_id)  # its reader fell too far behind

    async def _run(self) -> None:
        engine = self.engine
        self.last_progress = time.monotonic()
        try:
            while True:
                while self._controls:
                    fn, future = self._controls.popleft()
                    try:
                        result = await self._in_worker(fn, engine)
                        if not future.done():
                            future.set_result(result)
                    except Exception as exc:  # a bad request to change the engine fails alone
                        if not future.done():
                            future.set_exception(exc)
                    self.last_progress = time.monotonic()
                while self._to_admit:
                    request = self._to_admit.popleft()
                    try:
                        engine.admit(request)  # checks the adapter set again: it may be gone by now
                    except Exception as exc:
                        self._deliver(request.request_id, exc)
                while self._to_abort:
                    engine.abort(self._to_abort.popleft())
                if not engine.has_unfinished_requests():
                    self._wake.clear()
                    if not (self._controls or self._to_admit or self._to_abort):
                        await self._wake.wait()
                        self.last_progress = time.monotonic()  # idle time is not a stall
                    continue
                try:
                    outputs = await self._in_worker(engine.step)
                except Exception as exc:  # outside any step's batch (an engine bug): fail what is in flight
                    logger.exception("the engine loop caught an error outside a step; failing the requests in flight")
                    outputs = engine.fail_all(exc)
                self.last_progress = time.monotonic()
                for request_id, exc in engine.rejected:  # its adapter set could not be read: the client's error
                    self._deliver(request_id, exc)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # cancelled at shutdown (or worse): keep callers from hanging
            self.errored = exc
            for queue in self._queues.values():
                queue.put(RuntimeError("the engine loop has stopped"))
            raise

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let requests in flight finish for up to `timeout` seconds, then abort the rest."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self.engine.has_unfinished_requests() or self._to_admit) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self.engine.requests):
            self.abort(rid)
        while self.engine.has_unfinished_requests() and self._loop_task and not self._loop_task.done():
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass


async def _final(queue: OutputMailbox) -> RequestOutput:
    """A request's finished output (failures raise), skipping the ones before it."""
    while True:
        item = await queue.get()
        if isinstance(item, BaseException) or item.finished:
            return _checked(item)


def _checked(item):
    """An output as the caller sees it: failures raise."""
    if isinstance(item, BaseException):
        raise item
    if item.error is not None:
        raise StepFailedError(f"the request failed in an engine step: {item.error}")
    return item
