"""After sampling: append each new token, turn it into text, decide whether the sequence stops, and
build the request outputs that callers see.

Text grows incrementally (see detokenizer.py), so a step costs O(new tokens) per sequence, and
stop strings are searched only where the new text could complete one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldmole_runtime.engine.detokenizer import IncrementalDetokenizer, find_stop
from ldmole_runtime.engine.sequence import Sequence


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
    routing: list | None = None  # a RoutingEntry per token, when the request asked (routing_trace.py)


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
    prompt_routing: list | None = None  # as prompt_logprobs: position 0 has none
    routing_info: dict | None = None  # what the routing entries are about (routing_trace.describe_set)


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
                                 seq.finish_reason, seq.routing if seq.params.routing is not None else None)
                for seq in request.seqs]
        first = request.seqs[0]
        prompt_lp = None
        if first.prompt_logprobs_start is not None:
            prompt_lp = [None] * first.prompt_logprobs_start + list(first.prompt_logprobs)
        prompt_routing = None
        if first.prompt_logprobs_start is not None and first.params.routing is not None:
            prompt_routing = [None] * first.prompt_logprobs_start + list(first.prompt_routing)
        return RequestOutput(request.request_id, first.prompt_ids, request.adapter, outs, prompt_lp,
                             all(s.is_finished for s in request.seqs), first.num_cached_tokens, request.error,
                             prompt_routing, first.routing_info)
