"""Multiple-choice scoring from the outputs of forked requests: one context, one fork per choice.

The engine prefills the context once and keeps its KV (a held context); each choice then runs as a
fork that computes only its own tokens but the last, which is its target token. The first choice
token's logprob comes from the context's last position (`first_logprobs`); the rest are the fork's
prompt logprobs, the target's last. A one-token choice needs no fork (its output is None). A fork
that could not get a block for its copy recomputed the whole context instead (`forked` False):
all its choice tokens' logprobs are then its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmole_runtime.engine.output_processor import RequestOutput


@dataclass
class ChoiceScore:
    sum_logprob: float
    mean_logprob: float  # per token of the choice
    is_greedy: bool  # every choice token is the argmax at its position
    num_tokens: int


@dataclass
class ScoreResult:
    choices: list[ChoiceScore]
    best: int  # argmax of sum_logprob
    best_normalized: int  # argmax of mean_logprob
    routing: list[list] | None = None  # per choice, a RoutingEntry per choice token (when asked)
    routing_info: dict | None = None  # what the entries are about (routing_trace.describe_set)


def first_token_logprobs(context_logprobs: torch.Tensor, choice_ids: list[list[int]]) -> tuple[list[float], int]:
    """Each choice's first-token logprob, and the argmax token, from the held context's last position."""
    return context_logprobs[[c[0] for c in choice_ids]].tolist(), int(context_logprobs.argmax())


def score_choices(context_len: int, first: tuple[list[float], int], choice_ids: list[list[int]],
                  outputs: list[RequestOutput | None], forked: list[bool]) -> ScoreResult:
    """first: `first_token_logprobs(...)` of the context."""
    first, greedy_first = first
    scores = []
    for out, c, was_forked, lp0 in zip(outputs, choice_ids, forked, first, strict=True):
        entries = [] if out is None else [(lp.logprob, lp.is_greedy)
                                          for lp in out.prompt_logprobs[context_len + was_forked:]]
        if was_forked:
            entries.insert(0, (lp0, c[0] == greedy_first))
        total = sum(lp for lp, _ in entries)
        scores.append(ChoiceScore(total, total / len(c), all(g for _, g in entries), len(c)))
    best = max(range(len(scores)), key=lambda i: scores[i].sum_logprob)
    best_norm = max(range(len(scores)), key=lambda i: scores[i].mean_logprob)
    return ScoreResult(scores, best, best_norm)


def choice_routing(context_len: int, first, outputs: list[RequestOutput | None], forked: list[bool]) -> list[list]:
    """Each choice's routing entries, aligned as its logprobs are in `score_choices`: the first token's
    from the held context's last position (`first`) when forked, the rest from the choice's own request."""
    routing = []
    for out, was_forked in zip(outputs, forked, strict=True):
        own = [] if out is None or out.prompt_routing is None else list(out.prompt_routing[context_len + was_forked:])
        routing.append(([first] if was_forked else []) + own)
    return routing
