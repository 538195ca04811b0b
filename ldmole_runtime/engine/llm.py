"""The synchronous offline API.

    llm = LLM("default", adapters={"math": "adapters/math"})
    outs = llm.generate(["2 + 2 ="], SamplingParams(max_tokens=8, temperature=0), adapter="math")
    llm.score("Question ... Answer:", [" yes", " no"], adapter="math")
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence as Seq

from ..default_base import resolve_base
from ..errors import LDMoleError, StepFailedError
from ..runtime import LDMoleRuntime
from .llm_engine import EngineConfig, LLMEngine, RequestOutput
from .sampling_params import SamplingParams
from .scoring import ChoiceScore, ScoreResult, first_token_logprobs, score_choices  # noqa: F401 (API)


def load_tokenizer(base: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None  # token ids only (e.g. a test model without tokenizer files)


class LLM:
    def __init__(self, base: str | Path | LDMoleRuntime, adapters: dict | None = None, dtype: str = "float32",
                 device: str = "cpu", tokenizer=None, **engine_kwargs):
        if isinstance(base, LDMoleRuntime):
            runtime = base  # tokenizer: as given (None: token ids only)
        else:
            base = resolve_base(base)
            runtime = LDMoleRuntime.from_pretrained(base, adapters=adapters, dtype=dtype, device=device)
            tokenizer = tokenizer or load_tokenizer(base)
        self.engine = LLMEngine(runtime, tokenizer, EngineConfig(**engine_kwargs))
        self._ids = itertools.count()

    @property
    def runtime(self) -> LDMoleRuntime:
        return self.engine.runtime

    def generate(self, prompts: str | list[int] | Seq[str | list[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 adapter: str | None | Seq[str | None] = None) -> list[RequestOutput]:
        """Generate for every prompt (each may use its own params and adapter set); outputs in prompt order."""
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        params = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * n
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise LDMoleError(f"got {n} prompts, {len(params)} sampling params and {len(adapters)} adapters")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p, a in zip(ids, prompts, params, adapters):
            self.engine.add_request(rid, prompt, p, a)
        return self._run(ids)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        while wanted - done.keys():
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    if out.error is not None:
                        raise StepFailedError(f"request {out.request_id} failed in an engine step: {out.error}")
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def score(self, context: str | list[int], choices: Seq[str | list[int]], adapter: str | None = None) -> ScoreResult:
        """Log-likelihood of each choice after the context (multiple choice).

        The context's KV is computed once: every choice is a fork of it (full blocks shared, the
        last partial block copied) and computes only its own tokens; the first choice token's
        logprob comes from the context's last position.
        """
        ctx_ids = self.engine.encode(context)
        choice_ids = [self.engine.encode(c) for c in choices]
        if not ctx_ids or any(not c for c in choice_ids):
            raise LDMoleError("score needs a non-empty context and non-empty choices")
        ctx = f"score-ctx-{next(self._ids)}"
        self.engine.add_context(ctx, ctx_ids, adapter)
        try:
            self._run([ctx])
            first = first_token_logprobs(self.engine.context_logprobs(ctx), choice_ids)
            ids = [f"score-{next(self._ids)}" for _ in choice_ids]
            forked = [self.engine.fork_or_recompute(ctx, rid, c) for rid, c in zip(ids, choice_ids)]
        finally:
            self.engine.release_context(ctx)  # the forks hold their own references
        return score_choices(len(ctx_ids), first, choice_ids, self._run(ids), forked)
