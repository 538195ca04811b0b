"""The synchronous offline API.

    llm = LLM("default", adapters={"math": "adapters/math"})
    outs = llm.generate(["2 + 2 ="], SamplingParams(max_tokens=8, temperature=0), adapter="math")
    llm.score("Question ... Answer:", [" yes", " no"], adapter="math")
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from pathlib import Path

from ldmole_runtime.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.engine.scoring import (  # noqa: F401 (API)
    ChoiceScore,
    ScoreResult,
    first_token_logprobs,
    score_choices,
)
from ldmole_runtime.errors import LDMoleError, StepFailedError
from ldmole_runtime.lora.ops import lora_backend_setting
from ldmole_runtime.model.default_base import resolve_base
from ldmole_runtime.model.runtime import LDMoleRuntime
from ldmole_runtime.model.tokenizer import load_tokenizer


class LLM:
    def __init__(self, base: str | Path | LDMoleRuntime, adapters: dict | None = None, dtype: str = "float32",
                 device: str = "cpu", tokenizer=None, **engine_kwargs):
        if isinstance(base, LDMoleRuntime):
            runtime = base  # tokenizer: as given (None: token ids only)
        else:
            base = resolve_base(base)
            runtime = LDMoleRuntime.from_pretrained(base, adapters=adapters, dtype=dtype, device=device)
            tokenizer = tokenizer or load_tokenizer(base)
        if "mode" in engine_kwargs:  # the older name of lora_backend
            mode = engine_kwargs.pop("mode")
            engine_kwargs["lora_backend"] = lora_backend_setting(engine_kwargs.get("lora_backend"), mode)
        self.engine = LLMEngine(runtime, tokenizer, EngineConfig(**engine_kwargs))
        self._ids = itertools.count()
        self._awaited: set[str] = set()  # request ids a caller of _run waits for
        self._finished: dict[str, RequestOutput] = {}  # their final outputs, until collected

    @property
    def runtime(self) -> LDMoleRuntime:
        return self.engine.runtime

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapter: str | None | Seq[str | None] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (each may use its own params and adapter set); outputs in prompt order."""
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        params = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise LDMoleError(f"got {n} prompts, {len(params)} sampling params and {len(adapters)} adapters")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p, a in zip(ids, prompts, params, adapters, strict=True):
            self.engine.add_request(rid, prompt, p, a)
        return self._run(ids)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        """Step until every request in `ids` has finished. Other requests of this LLM that finish
        meanwhile keep their outputs for a later call."""
        self._awaited.update(ids)
        while any(i not in self._finished for i in ids):
            for out in self.engine.step():
                if out.finished and out.request_id in self._awaited:
                    self._finished[out.request_id] = out
        outputs = [self._finished.pop(i) for i in ids]
        self._awaited.difference_update(ids)
        for out in outputs:
            if out.error is not None:
                raise StepFailedError(f"request {out.request_id} failed in an engine step: {out.error}")
        return outputs

    def _forget(self, ids) -> None:
        """Abort requests that will not be collected (after a failure); no-op for finished ones."""
        for rid in ids:
            self.engine.abort(rid)
            self._awaited.discard(rid)
            self._finished.pop(rid, None)

    def score(self, context: str | list[int], choices: Seq[str | list[int]], adapter: str | None = None) -> ScoreResult:
        """Log-likelihood of each choice after the context (multiple choice).

        The context's KV is computed once: every choice is a fork of it (full blocks shared, the
        last partial block copied) and computes only its own tokens; the first choice token's
        logprob comes from the context's last position.
        """
        return self.score_many([(context, choices)], adapter)[0]

    def score_many(self, items: Seq[tuple[str | list[int], Seq[str | list[int]]]],
                   adapter: str | None = None) -> list[ScoreResult]:
        """`score` for many (context, choices) items at once: all contexts prefill in shared steps,
        then all forks run together. A choice's last token is only a target: it is scored from the
        logits before it and never run, so a one-token choice costs nothing past its context. An
        item with a single choice needs no fork: it runs as one prompt. Held contexts cannot be
        preempted, so the items run in consecutive groups that fit in half the KV cache."""
        encoded = []
        for context, choices in items:
            ctx_ids, choice_ids = self.engine.encode(context), [self.engine.encode(c) for c in choices]
            if not ctx_ids or not choice_ids or any(not c for c in choice_ids):
                raise LDMoleError("score needs a non-empty context and non-empty choices")
            encoded.append((ctx_ids, choice_ids))
        block = self.engine.config.block_size
        budget = max(self.engine.block_manager.num_blocks // 2, 1)
        results, group, used = [], [], 0
        for ctx_ids, choice_ids in encoded:
            need = -(-len(ctx_ids) // block) + sum(-(-len(c) // block) + 1 for c in choice_ids)
            if group and used + need > budget:
                results += self._score_group(group, adapter)
                group, used = [], 0
            group.append((ctx_ids, choice_ids))
            used += need
        return results + (self._score_group(group, adapter) if group else [])

    def _score_group(self, encoded: list[tuple[list[int], list[list[int]]]], adapter: str | None) -> list[ScoreResult]:
        held = {i: f"score-ctx-{next(self._ids)}" for i, (_, choices) in enumerate(encoded) if len(choices) > 1}
        # one request per choice, except one-token choices of a held context (read off the context)
        names = [[None if i in held and len(c) == 1 else f"score-{next(self._ids)}" for c in choices]
                 for i, (_, choices) in enumerate(encoded)]
        every = [rid for row in names for rid in row if rid is not None]
        firsts, forked = {}, [[False] * len(choices) for _, choices in encoded]
        try:
            for i, name in held.items():
                self.engine.add_context(name, encoded[i][0], adapter)
            for i, (ctx_ids, choices) in enumerate(encoded):
                if i not in held:
                    c = choices[0]
                    self.engine.add_request(names[i][0], ctx_ids + c[:-1], SamplingParams(max_tokens=0), adapter,
                                            prompt_logprobs_from=len(ctx_ids), target_token=c[-1])
            self._awaited.update(every)  # single-choice requests may finish while the contexts run
            self._run(list(held.values()))
            for i, name in held.items():
                firsts[i] = first_token_logprobs(self.engine.context_logprobs(name), encoded[i][1])
                forked[i] = [rid is None or self.engine.fork_or_recompute(name, rid, c[:-1], c[-1])
                             for rid, c in zip(names[i], encoded[i][1], strict=True)]
                self.engine.release_context(name)  # the forks hold their own references
            done = dict(zip(every, self._run(every), strict=True))
        finally:
            for name in held.values():
                self.engine.release_context(name)
            self._forget([*held.values(), *every])
        return [score_choices(len(ctx_ids), firsts.get(i, ([0.0] * len(choices), -1)), choices,
                              [done.get(rid) for rid in names[i]], forked[i])
                for i, (ctx_ids, choices) in enumerate(encoded)]
