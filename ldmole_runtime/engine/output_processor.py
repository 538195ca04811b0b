"""After sampling: append each new token, turn it into text, decide whether the sequence stops, and
build the request outputs that callers see, and hand them to their readers (OutputMailbox).

Text grows incrementally (see detokenizer.py), so a step costs O(new tokens) per sequence, and
stop strings are searched only where the new text could complete one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ldmole_runtime.engine.detokenizer import IncrementalDetokenizer, find_stop
from ldmole_runtime.engine.sequence import Sequence
from ldmole_runtime.errors import LDMoleError


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the top-N alternatives (token id -> logprob)
    is_greedy: bool | None = None  # the token is the argmax at its position (known for prompt tokens)


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    adapter: str | None
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None  # position 0 has none
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed inside a step (finish_reason "error")


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len

    def append_token(self, seq: Sequence, token: int) -> str | None:
        """Add a sampled token to seq; returns the finish reason if seq stops here."""
        seq.token_ids.append(token)
        new_chars = self._extend_text(seq)
        p = seq.params
        n_out = seq.num_tokens - seq.num_prompt_tokens
        if n_out >= p.min_tokens:
            if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
                return "stop"
            if p.stop and new_chars:
                at = find_stop(seq.text, new_chars, p.stop)
                if at is not None:
                    seq.text = seq.text[:at]
                    return "stop"
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _extend_text(self, seq: Sequence) -> int:
        if self.tokenizer is None:
            return 0
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.num_prompt_tokens)
        delta = seq.detokenizer.delta(seq.token_ids)
        seq.text += delta
        return len(delta)

    def request_output(self, request) -> RequestOutput:
        outs = [CompletionOutput(seq.index, seq.output_ids, seq.text,
                                 seq.output_logprobs if seq.params.logprobs is not None else None,
                                 seq.finish_reason)
                for seq in request.seqs]
        first = request.seqs[0]
        prompt_lp = None
        if first.prompt_logprobs_start is not None:
            prompt_lp = [None] * first.prompt_logprobs_start + list(first.prompt_logprobs)
        return RequestOutput(request.request_id, first.prompt_ids, request.adapter, outs, prompt_lp,
                             all(s.is_finished for s in request.seqs), first.num_cached_tokens, request.error)

# ---- delivery: a request's outputs on their way to its reader ------------------------------------------
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
