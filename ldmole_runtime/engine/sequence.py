"""One sequence being generated (or scored): its tokens, its KV blocks, and where it stands."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ldmole_runtime.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ldmole_runtime.engine.adapter_cache import AdapterHandle


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    adapter: str | None  # adapter-set name (None: the bare base)
    adapter_key: str  # identifies the adapter set's weights in prefix-cache hashes
    params: SamplingParams
    handle: AdapterHandle | None = None  # the set, resolved once when the request arrived (it finds the set's slot)
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    # prompt logprobs are wanted for the prompt tokens from this position on (None: not wanted)
    prompt_logprobs_start: int | None = None
    prompt_logprobs: list = field(default_factory=list)  # one entry per scored prompt token, in order
    output_logprobs: list = field(default_factory=list)
    routing: list = field(default_factory=list)  # a RoutingEntry per output token, when params.routing asks
    prompt_routing: list = field(default_factory=list)  # one per scored prompt token, as prompt_logprobs
    routing_info: dict | None = None  # routing_trace.describe_set of its set, once it has run
    final_routing: object | None = None  # held contexts: the RoutingEntry of the last position
    finish_reason: str | None = None
    hold: bool = False  # keep the KV blocks when finished, for forks (scoring)
    # scoring: a token after the prompt whose logprob is read from the last position's logits and
    # appended to prompt_logprobs, without running it through the model (the last token of a scored
    # continuation is only ever a target)
    target_token: int | None = None
    final_logprobs: torch.Tensor | None = None  # held sequences: log_softmax at the last position
    text: str = ""  # the output so far, detokenised incrementally (cut before a stop string that ended it)
    detokenizer: object | None = None  # IncrementalDetokenizer, made at the first output token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def next_prompt_logprob(self) -> int | None:
        """The next prompt position whose logprob is still to be computed, or None."""
        if self.prompt_logprobs_start is None:
            return None
        position = self.prompt_logprobs_start + len(self.prompt_logprobs)
        return position if position < self.num_prompt_tokens else None

    @property
    def remaining_prefill(self) -> int:
        """Tokens not yet in the KV cache (1 for a sequence in decode)."""
        return self.num_tokens - self.num_computed_tokens
