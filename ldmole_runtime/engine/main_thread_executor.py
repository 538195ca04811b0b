"""Run the engine's steps on the process's main thread while asyncio serves from another one.

Measured on 2 CPU cores: the same offline generation runs about 20% slower when its torch work
happens on a thread other than the main one (205 vs 160 output tokens/s, SmolLM2-135M with an
LD-MoLE set, batch 32; thread counts and malloc arenas set alike), so `ldmole serve` runs uvicorn's
event loop in a background thread and hands every engine step and control to the main thread
through this executor. AsyncLLMEngine awaits it like any other executor.
"""

from __future__ import annotations

import concurrent.futures
import queue
from collections.abc import Callable


class MainThreadExecutor(concurrent.futures.Executor):
    def __init__(self):
        self._calls: queue.Queue = queue.Queue()

    def submit(self, fn: Callable, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def run_until(self, done: Callable[[], bool], poll_s: float = 0.1) -> None:
        """Run submitted calls on the calling thread until done() is true (checked every poll_s)."""
        while not done():
            try:
                future, fn, args, kwargs = self._calls.get(timeout=poll_s)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine, as a thread pool would
                future.set_exception(exc)
