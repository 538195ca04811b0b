"""A request's outputs on their way to its reader (an HTTP stream, a score, a caller of `generate`).

The engine reports a request's cumulative output after every step that advanced it. A reader that
falls behind needs only the newest: an unread output is replaced by the next one, so a client that
does not read holds one output (what it has not read), never a copy per step (vLLM merges deltas
the same way). A failure or the finished output is never replaced. Past `max_unread_tokens` tokens
generated and not read, the reader is cut off with a clear error and the request is aborted.
"""

from __future__ import annotations

import asyncio

from ldmole_runtime.errors import LDMoleError


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
