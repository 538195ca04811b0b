"""The engine loop: requests in, one scheduled forward per step, tokens out.

Requests for different adapter sets (and the bare base) share every step. `step()` runs one
forward over the sequences the scheduler picked, samples the ones that reached their last token,
checks stop conditions, and reports every request that made progress.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.engine.adapter_cache import AdapterCache, AdapterHandle
from ldmole_runtime.engine.block_manager import BlockManager
from ldmole_runtime.engine.config import EngineConfig  # noqa: F401 (API: engine users import it from here)
from ldmole_runtime.engine.expert_stats import ExpertHistogram
from ldmole_runtime.engine.memory import reserve_for
from ldmole_runtime.engine.model_runner import ModelRunner
from ldmole_runtime.engine.output_processor import (  # noqa: F401 (API)
    CompletionOutput,
    OutputProcessor,
    RequestOutput,
    TokenLogprob,
)
from ldmole_runtime.engine.routing_trace import describe_set
from ldmole_runtime.engine.sampler import gather_logprobs, sample
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.engine.scheduler import Scheduler
from ldmole_runtime.engine.sequence import Sequence
from ldmole_runtime.errors import LDMoleError, PromptTooLongError, UnknownAdapterError
from ldmole_runtime.model.runtime import LDMoleRuntime

logger = logging.getLogger("ldmole.engine")


@dataclass
class _Request:
    request_id: str
    adapter: str | None
    seqs: list[Sequence]
    params: SamplingParams
    handle: AdapterHandle | None = None
    finished_reported: bool = False
    error: str | None = None  # why a step failed it


class LLMEngine:
    def __init__(self, runtime: LDMoleRuntime, tokenizer=None, config: EngineConfig | None = None):
        self.runtime, self.tokenizer = runtime, tokenizer
        config = config or EngineConfig()
        self.memory = reserve_for(runtime, config.max_loras, config.max_cpu_loras, config.adapter_dir)
        self.config = config = config.resolve(runtime, tokenizer, self.memory)
        self.max_model_len, self.vocab_size = config.max_model_len, config.vocab_size
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        if config.max_loras is not None:
            runtime.bank.limit(config.max_loras)
        self.adapters = AdapterCache(runtime, config.max_cpu_loras, config.adapter_dir, config.pinned_adapters)
        self.rejected: list[tuple[str, Exception]] = []  # requests the last step failed before they ran
        self.runner = ModelRunner(runtime, config)
        self.requests: dict[str, _Request] = {}
        self.held: dict[str, Sequence] = {}  # finished contexts whose KV blocks stay for forks
        self.eos_token_ids = config.eos_token_ids
        self.outputs = OutputProcessor(tokenizer, self.eos_token_ids, self.max_model_len)
        self.expert_histogram = ExpertHistogram()
        self.failed_steps = 0
        self.generated_tokens = 0
        self.computed_tokens = 0  # tokens run through the model (prefill chunks and decodes)

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    adapter: str | AdapterHandle | None = None, prompt_logprobs_from: int | None = None,
                    target_token: int | None = None) -> None:
        """Queue a request. `prompt_logprobs_from` asks for prompt logprobs from that position on
        (scoring); `params.prompt_logprobs` asks for all of them. `target_token` (with max_tokens 0)
        adds the logprob of that token after the prompt, as if it were one more prompt token."""
        self.admit(self.prepare_request(request_id, prompt, params, adapter, prompt_logprobs_from, target_token))

    def admit(self, request: _Request) -> None:
        """Queue a prepared request. Its adapter set is checked again here: it may have been unloaded
        since the request was prepared."""
        if request.request_id in self.requests:
            raise LDMoleError(f"request id {request.request_id!r} is already in use")
        if request.handle is not None and request.handle.removed:
            raise UnknownAdapterError(f"unknown adapter set {request.adapter!r}: it was unloaded")
        self.requests[request.request_id] = request
        handle = request.handle
        # on the device and not draining: straight to the scheduler (read here, not asked of the cache: every
        # request passes this line)
        if handle is None or (handle.slot is not None and not handle.draining):
            self.adapters.hits += handle is not None
            self._schedule(request)
        else:  # its set is not on the device: it waits for a slot, outside the scheduler
            self.adapters.misses += 1
            self.adapters.wait(handle, request)

    def _schedule(self, request: _Request) -> None:
        if request.handle is not None:  # AdapterCache.touch, inlined: this runs for every request
            self.adapters.clock += 1
            request.handle.last_used = self.adapters.clock
        for seq in request.seqs:
            self.scheduler.add(seq)

    def _place_adapters(self) -> None:
        """Copy the sets that requests wait for into slots (between steps), and queue those requests."""
        ready, failed = self.adapters.place(self._busy_sets())
        for request in ready:
            if self.requests.get(request.request_id) is request:  # not aborted meanwhile
                self._schedule(request)
        for request, exc in failed:
            self.rejected.append((request.request_id, exc))
            self._fail_requests([request.request_id], exc)
        self.runner.warm_up()  # a set that did not fit the slots' shape makes the bank lay itself out again

    def _busy_sets(self) -> set[AdapterHandle]:
        """Sets with admitted requests or held contexts: they keep their slots (requests still waiting
        for a slot do not count)."""
        waiting = {id(r) for requests in self.adapters.pending.values() for r in requests}
        busy = {r.handle for r in self.requests.values() if r.handle is not None and id(r) not in waiting}
        return busy | {s.handle for s in self.held.values() if s.handle is not None}

    @property
    def num_pending(self) -> int:
        """Sequences whose requests wait for their adapter set to reach a slot."""
        return sum(len(r.seqs) for requests in list(self.adapters.pending.values()) for r in requests)

    def prepare_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                        adapter: str | AdapterHandle | None = None, prompt_logprobs_from: int | None = None,
                        target_token: int | None = None, serving_limits: bool = False) -> _Request:
        """Validate a request and build its sequences, without touching the running batch: the one
        place a request is checked. `serving_limits` adds the HTTP API's stricter rules: the prompt
        and max_tokens must fit the context together, and n may not exceed max_num_seqs."""
        params = params or SamplingParams()
        handle = self.resolve_adapter(adapter)
        if target_token is not None:
            if params.max_tokens != 0 or params.n != 1:
                raise LDMoleError("a target token is scored by a prompt-only request (max_tokens=0, n=1)")
            if not 0 <= target_token < self.vocab_size:
                raise LDMoleError(f"the target token must lie in [0, {self.vocab_size})")
        token_ids = self.encode(prompt)
        if not token_ids:
            raise LDMoleError("the prompt is empty")
        vocab = self.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise LDMoleError(f"prompt token ids must lie in [0, {vocab})")
        if any(t >= vocab for t in params.logit_bias) or any(t >= vocab for t in params.stop_token_ids):
            raise LDMoleError(f"token ids in logit_bias and stop_token_ids must lie in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {len(token_ids)} tokens; the maximum is {self.max_model_len - 1} "
                                     f"(max_model_len {self.max_model_len} includes at least one generated token)")
        if serving_limits:
            self._check_serving_limits(len(token_ids), params)
        if params.stop and self.tokenizer is None:
            raise LDMoleError("stop strings need a tokenizer; this base model has none (use stop_token_ids)")
        if params.prompt_logprobs is not None:
            prompt_logprobs_from = 1
        if target_token is not None and prompt_logprobs_from is None:
            prompt_logprobs_from = len(token_ids)
        if prompt_logprobs_from is not None:
            prompt_logprobs_from = min(max(prompt_logprobs_from, 1), len(token_ids))
        name = None if handle is None else handle.name
        # the set's identity in prefix-cache hashes: this load of it (the same across evictions, which
        # bring back the same weights), so that a set reloaded under the same name never reuses blocks
        # computed with the old weights
        adapter_key = "" if handle is None else f"{handle.name}#{handle.uid}"
        seqs = []
        for i in range(params.n):
            seed = params.sample_seed(i)
            seqs.append(Sequence(
                request_id, i, list(token_ids), len(token_ids), name, adapter_key, params, handle,
                generator=None if seed is None else torch.Generator(self.runtime.device).manual_seed(seed),
                prompt_logprobs_start=prompt_logprobs_from if i == 0 else None, target_token=target_token))
        return _Request(request_id, name, seqs, params, handle)

    def _check_serving_limits(self, prompt_len: int, params: SamplingParams) -> None:
        if params.n > self.config.max_num_seqs:
            raise LDMoleError(f"n must be <= {self.config.max_num_seqs} (max_num_seqs), got {params.n}")
        room = self.max_model_len - prompt_len
        if params.max_tokens is not None and params.max_tokens > room:
            raise LDMoleError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                              f"{prompt_len} and max_tokens asks for {params.max_tokens} more")

    def resolve_adapter(self, adapter: str | AdapterHandle | None) -> AdapterHandle | None:
        """The servable set a request names (None: the bare base), resolved once: the request keeps the
        handle, which finds the set's slot whenever it is on the device."""
        if adapter is None:
            return None
        if isinstance(adapter, AdapterHandle):
            if adapter.removed:
                raise UnknownAdapterError(f"unknown adapter set {adapter.name!r}: it was unloaded")
            return adapter
        handle = self.adapters.handles.get(adapter)  # the common case, without a call (resolve() says the rest)
        if handle is not None and (handle.slot is None or handle.slot.index is not None):
            return handle
        return self.adapters.resolve(adapter)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LDMoleError("text prompts need a tokenizer; this base model has none (pass token ids)")
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise LDMoleError("a prompt is a string or a list of token ids")
        return list(prompt)

    def abort(self, request_id: str) -> None:
        # a context held for forks whose caller left (it may have finished in the step that was
        # running when the caller went): nothing else would ever free its blocks
        self.release_context(request_id)
        request = self.requests.get(request_id)
        if request is None:
            return
        waiting = self.adapters.pending.get(request.handle)
        if waiting is not None and request in waiting:
            waiting.remove(request)
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    # ---- forks: one context, many continuations (scoring) ---------------------------------------------
    def add_context(self, request_id: str, prompt: str | list[int], adapter: str | AdapterHandle | None = None) -> None:
        """Prefill a context and keep its KV after it finishes, for `fork_request`."""
        self.admit(self.prepare_context(request_id, prompt, adapter))

    def prepare_context(self, request_id: str, prompt: str | list[int],
                        adapter: str | AdapterHandle | None = None, routing: str | None = None) -> _Request:
        """`routing`: keep the routing of the context's last position too (`context_routing`)."""
        request = self.prepare_request(request_id, prompt, SamplingParams(max_tokens=0, routing=routing), adapter)
        request.seqs[0].hold = True
        return request

    def context_logprobs(self, context_id: str) -> torch.Tensor:
        """log_softmax at a held context's last position: the logprobs of a continuation's first token."""
        return self.held[context_id].final_logprobs

    def context_routing(self, context_id: str) -> tuple[object | None, dict | None]:
        """A held context's last-position RoutingEntry (a continuation's first token) and its set's
        description, when it was prepared with `routing`."""
        seq = self.held[context_id]
        return seq.final_routing, seq.routing_info

    def fork_request(self, context_id: str, request_id: str, continuation: list[int],
                     target_token: int | None = None, routing: str | None = None) -> bool:
        """A prompt-only request for context + continuation that reuses the held context's KV, full
        blocks shared and its last partial block copied. Its prompt logprobs start after the first
        continuation token, whose logprob is the context's `final_logprobs`. False if no cache block
        is free for the copy (nothing is queued then)."""
        parent = self.held[context_id]
        request = self.prepare_request(request_id, parent.token_ids + list(continuation),
                                       SamplingParams(max_tokens=0, routing=routing),
                                       parent.handle, parent.num_tokens + 1, target_token)
        child = request.seqs[0]
        child.adapter_key = parent.adapter_key
        if not self.block_manager.fork(parent, child, self.runner.copy_block):
            return False
        self.admit(request)
        return True

    def fork_or_recompute(self, context_id: str, request_id: str, continuation: list[int],
                          target_token: int | None = None, routing: str | None = None) -> bool:
        """`fork_request`, or, when no block is free for the copy, a plain request that recomputes the
        context (its prompt logprobs then start at the continuation). True if it was forked."""
        if self.fork_request(context_id, request_id, continuation, target_token, routing):
            return True
        parent = self.held[context_id]
        self.add_request(request_id, parent.token_ids + list(continuation),
                         SamplingParams(max_tokens=0, routing=routing), parent.handle, parent.num_tokens, target_token)
        return False

    def release_context(self, context_id: str) -> None:
        seq = self.held.pop(context_id, None)
        if seq is not None:
            self.block_manager.release(seq)

    def load_adapter(self, name: str, source) -> None:
        """A new servable set (a folder, or an AdapterSet): into a free slot if there is one, else it
        waits in host memory for its first request."""
        adapter = source if isinstance(source, AdapterSet) else AdapterSet.load(source)
        self.adapters.add(name, adapter, None if isinstance(source, AdapterSet) else Path(source))
        self.runner.warm_up()

    def unload_adapter(self, name: str) -> list[str]:
        """Abort the set's requests (they finish with reason "abort"), then drop its weights."""
        self.adapters.resolve(name)  # unknown name: a clear error, nothing aborted
        aborted = [rid for rid, r in self.requests.items() if r.adapter == name]
        for rid in aborted:
            self.abort(rid)
        for rid, seq in list(self.held.items()):
            if seq.adapter == name:
                self.release_context(rid)
        self.adapters.remove(name)
        self.expert_histogram.by_adapter.pop(name, None)  # a set that is gone keeps no metric series
        self.runner.warm_up()
        return aborted

    def classify(self, token_ids: list[int], adapter: str | AdapterHandle | None = None) -> torch.Tensor:
        """Class probabilities from the adapter set's (or the base's) classification head."""
        if len(token_ids) > self.max_model_len:
            raise PromptTooLongError(f"the input has {len(token_ids)} tokens; the maximum is {self.max_model_len}")
        handle = self.resolve_adapter(adapter)
        if handle is not None:  # runs between steps: its set must be on the device for this forward
            self.adapters.ensure_resident(handle, self._busy_sets())
            self.adapters.touch(handle)
            self.runner.warm_up()
        return self.runtime.classify(token_ids, None if handle is None else handle.name)

    def has_unfinished_requests(self) -> bool:
        # a snapshot: the async front also asks from its event-loop thread while a step runs
        return any(not r.finished_reported for r in list(self.requests.values()))

    # ---- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.rejected = []
        if self.adapters.pending:
            self._place_adapters()
        batch = self.scheduler.schedule()
        touched: dict[str, _Request] = {}
        for seq, exc in self.scheduler.faults:  # a sequence that could not be placed fails its request alone
            logger.error("scheduling request %s failed", seq.request_id, exc_info=exc)
            self._fail_requests([seq.request_id], exc)
        if batch:
            try:
                self._run_batch(batch, touched)
            except Exception as exc:  # one failed step fails its own requests, never the engine
                self._fail(batch, exc)
        if not batch and self.adapters.pending:  # nothing to run until a set is read: wait for it, not spin
            self.adapters.wait_for_reads(timeout=0.05)
        outputs = self._report(touched)
        if self.config.check_blocks:
            self.check_blocks()
        return outputs

    def check_blocks(self) -> None:
        """Raise if a KV block is used by no live sequence (a leak) or freed while one still names it."""
        owners = [*self.scheduler.running, *self.scheduler.waiting, *self.held.values()]
        errors = self.block_manager.ownership_errors(owners)
        if errors:
            raise RuntimeError(f"KV block ownership broken ({len(errors)} block(s)): " + "; ".join(errors[:5]))

    def _report(self, touched: dict) -> list[RequestOutput]:
        # aborted / finished requests are reported once, even when nothing ran for them
        for request in self.requests.values():
            if all(s.is_finished for s in request.seqs) and not request.finished_reported:
                touched[request.request_id] = request
        outputs = [self.outputs.request_output(r) for r in touched.values()]
        for out in outputs:
            if out.finished:
                self.requests[out.request_id].finished_reported = True
                del self.requests[out.request_id]
        return outputs

    def _run_batch(self, batch: list[tuple[Sequence, int]], touched: dict) -> None:
        every = self.config.expert_sample_every
        count_experts = every > 0 and self.scheduler.stats.steps % every == 0
        step = self.runner.run(batch, count_experts)
        for seq, n in batch:
            if seq.params.routing is not None and seq.routing_info is None:
                seq.routing_info = describe_set(None if seq.handle is None else seq.handle.slot)
            seq.num_computed_tokens += n
            self.computed_tokens += n
            self.block_manager.commit(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        self._record_prompt_logprobs(step)
        for seq, kind, entry in step.routing:  # a sampled token's entry: its token is appended just below
            if kind == "final":
                seq.final_routing = entry
            else:
                (seq.routing if kind == "sampled" else seq.prompt_routing).append(entry)
        if step.sample_seqs:
            self._sample(step.sample_seqs, step.sample_logits)
        if step.expert_means is not None:
            self.expert_histogram.add(step.expert_means, step.token_sets, self.runtime.bank.names_by_index())

    def fail_all(self, exc: Exception) -> list[RequestOutput]:
        """Fail every request in flight (after an error outside any step) and report them."""
        self._fail_requests(list(self.requests), exc)
        return self._report({})

    def _fail(self, batch: list[tuple[Sequence, int]], exc: Exception) -> None:
        """Finish every request with a sequence in the failed step, reason "error", freeing its blocks."""
        self.failed_steps += 1
        logger.exception("an engine step failed; its %d sequences' requests fail with it", len(batch))
        self._fail_requests({seq.request_id for seq, _ in batch}, exc)

    def _fail_requests(self, request_ids, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        for request_id in request_ids:
            request = self.requests[request_id]
            request.error = request.error or message
            for seq in request.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "error")

    def _record_prompt_logprobs(self, step) -> None:
        if not step.prompt_spans:
            return
        k = max(s.params.prompt_logprobs or 0 for s, _, _ in step.prompt_spans)
        targets = torch.tensor([t for s, first, end in step.prompt_spans for t in s.token_ids[first:end]],
                               device=step.prompt_logits.device)
        chosen, top_ids, top_lp = gather_logprobs(torch.log_softmax(step.prompt_logits, -1), targets, k)
        greedy = (step.prompt_logits.argmax(-1) == targets).tolist()
        chosen = chosen.tolist()
        top_ids = top_ids.tolist() if top_ids is not None else None
        top_lp = top_lp.tolist() if top_lp is not None else None
        r = 0
        for seq, first, end in step.prompt_spans:  # one output entry per scored token: the API's shape
            n = seq.params.prompt_logprobs or 0
            for token in seq.token_ids[first:end]:
                top = dict(zip(top_ids[r][:n], top_lp[r][:n], strict=True)) if n else {}
                seq.prompt_logprobs.append(TokenLogprob(token, chosen[r], top, greedy[r]))
                r += 1

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        keep = [i for i, s in enumerate(seqs) if s.params.max_tokens != 0]
        targeted = [i for i, s in enumerate(seqs) if s.target_token is not None]
        if targeted:
            self._score_targets([seqs[i] for i in targeted], logits[targeted])
        for i, seq in enumerate(seqs):
            if seq.params.max_tokens == 0:  # prompt only: scoring
                if seq.hold:
                    seq.final_logprobs = torch.log_softmax(logits[i], -1)
                    self.held[seq.request_id] = seq
                self.scheduler.finish(seq, "length", release=not seq.hold)
        if not keep:
            return
        sampled = [seqs[i] for i in keep]
        if len(keep) != len(seqs):
            logits = logits[keep]
        out = sample(logits, [s.params for s in sampled], [s.prompt_ids for s in sampled],
                     [s.output_ids for s in sampled], [s.generator for s in sampled], self.eos_token_ids)
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for r, seq in enumerate(sampled):
            token = token_ids[r]
            self.generated_tokens += 1
            if seq.params.logprobs is not None:
                n = seq.params.logprobs
                seq.output_logprobs.append(
                    TokenLogprob(token, logprobs[r], dict(zip(top_ids[r][:n], top_lp[r][:n], strict=True)) if n else {})
                )
            reason = self.outputs.append_token(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)

    def _score_targets(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        targets = torch.tensor([s.target_token for s in seqs], device=logits.device)
        chosen = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1).tolist()
        greedy = (logits.argmax(-1) == targets).tolist()
        for seq, logprob, is_greedy in zip(seqs, chosen, greedy, strict=True):
            seq.prompt_logprobs.append(TokenLogprob(seq.target_token, logprob, {}, is_greedy))

    # ---- introspection --------------------------------------------------------------------------
    def stats(self) -> dict:
        bm, cache, a = self.block_manager, self.block_manager.stats, self.adapters
        tiers = a.counts()
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting) + self.num_pending,
            "kv_blocks_total": bm.num_blocks, "kv_blocks_free": bm.num_free_blocks,
            "prefix_cache_queried_tokens": cache.queried_tokens, "prefix_cache_hit_tokens": cache.hit_tokens,
            "prefix_cache_evictions": cache.evictions, "preemptions": self.scheduler.stats.preemptions,
            "steps": self.scheduler.stats.steps, "generated_tokens": self.generated_tokens,
            "computed_tokens": self.computed_tokens, "failed_steps": self.failed_steps,
            "adapters_device": tiers["device"], "adapters_host": tiers["host"],
            "adapter_loads_disk": a.loads["disk"], "adapter_loads_host": a.loads["host"],
            "adapter_evictions": a.evictions,
        }
