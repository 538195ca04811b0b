"""Prometheus metrics in vLLM's style, with an `ldmole:` prefix and an `adapter` label.

Request-level series (tokens, latencies, outcomes) are recorded by the routes as outputs stream
out. Engine-level series (running and waiting requests, KV-cache usage, prefix-cache hits,
preemptions, and the histogram of active experts per token) are read from the engine at scrape
time, so the engine loop does no metrics work of its own.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine  # AsyncLLMEngine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("ldmole:num_requests_running", "Sequences in the running batch.", s["running"])
        yield GaugeMetricFamily("ldmole:num_requests_waiting", "Sequences waiting to be scheduled.", s["waiting"])
        used = 1.0 - s["kv_blocks_free"] / s["kv_blocks_total"]
        yield GaugeMetricFamily("ldmole:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", used)
        yield GaugeMetricFamily("ldmole:kv_cache_blocks_in_use", "KV-cache blocks in use.",
                                s["kv_blocks_total"] - s["kv_blocks_free"])
        yield CounterMetricFamily("ldmole:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  s["prefix_cache_queried_tokens"])
        yield CounterMetricFamily("ldmole:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  s["prefix_cache_hit_tokens"])
        queried = s["prefix_cache_queried_tokens"]
        hit_rate = s["prefix_cache_hit_tokens"] / queried if queried else 0.0
        yield GaugeMetricFamily("ldmole:prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens, since start.",
                                hit_rate)
        yield CounterMetricFamily("ldmole:num_preemptions", "Sequences preempted (KV cache full).", s["preemptions"])
        yield CounterMetricFamily("ldmole:engine_failed_steps", "Engine steps that raised (their requests failed).",
                                  s["failed_steps"])
        yield GaugeMetricFamily("ldmole:engine_stalled_seconds",
                                "Seconds that work has waited with no engine step finishing (0: idle or moving; "
                                "over --stall-timeout, /health answers 503).", self.engine.stalled_for())
        yield from _adapter_tiers(self.engine.engine.adapters)
        hist = self.engine.expert_histogram
        family = HistogramMetricFamily(
            "ldmole:active_experts_per_token",
            "Mean experts with p > 0 per routing decision of a token (sampled steps), per adapter set.",
            labels=["adapter"])
        for name, (counts, total, _) in list(hist.by_adapter.items()):
            cumulative, buckets = 0, []
            for bound, c in zip(list(hist.buckets) + [float("inf")], counts, strict=True):
                cumulative += c
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([name], buckets, total)
        yield family


def _adapter_tiers(cache):
    """The adapter tiers (engine/adapter_cache.py): no per-set label, so 10,000 sets are still a few series."""
    family = GaugeMetricFamily("ldmole:adapters", "Adapter sets per tier: device (in a slot), host (read, in "
                               "memory, not in a slot).", labels=["tier"])
    for tier, n in cache.counts().items():
        family.add_metric([tier], n)
    yield family
    loads = CounterMetricFamily("ldmole:adapter_loads", "Sets copied into a slot, by where they came from.",
                                labels=["source"])
    for source, n in cache.loads.items():
        loads.add_metric([source], n)
    yield loads
    yield CounterMetricFamily("ldmole:adapter_evictions", "Sets evicted from their slot (LRU, idle).",
                              cache.evictions)
    yield CounterMetricFamily("ldmole:adapter_slot_hits", "Requests whose set was in a slot when they arrived.",
                              cache.hits)
    yield CounterMetricFamily("ldmole:adapter_slot_misses", "Requests that waited for their set to reach a slot.",
                              cache.misses)
    for name, doc, hist in (("ldmole:adapter_load_seconds", "Time to copy a set into a slot (between steps).",
                             cache.load_seconds),
                            ("ldmole:adapter_wait_seconds", "Time requests waited for their set to reach a slot "
                             "(reading it included).", cache.wait_seconds)):
        counts = hist.counts or [0] * (len(hist.buckets) + 1)
        cumulative, buckets = 0, []
        for bound, c in zip([*hist.buckets, float("inf")], counts, strict=True):
            cumulative += c
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family = HistogramMetricFamily(name, doc)
        family.add_metric([], buckets, hist.total)
        yield family


class SelectorCollector:
    """The adapter selector's decisions per adapter set, read at scrape time."""

    def __init__(self, selector):
        self.selector = selector

    def collect(self):
        family = CounterMetricFamily("ldmole:adapter_selector_decisions",
                                     "Requests with model 'auto', by the adapter set the adapter selector chose.",
                                     labels=["adapter"])
        for name, n in sorted(self.selector.decisions.items()):
            family.add_metric([name], n)
        yield family


OTHER = "other"  # the label of sets past the cap


class ServerMetrics:
    """The server's metrics. Series are labelled by adapter set: at most max_labelled_sets names get
    their own (the rest share "other"), and a set's series go when it is unloaded (`forget`), so
    loading and unloading many sets does not grow a scrape without bound."""

    def __init__(self, engine, adapter_selector=None, max_labelled_sets: int = 64):
        self.max_labelled_sets = max_labelled_sets
        self.labelled: set[str] = set()
        self.series: dict[str, set[tuple]] = {}  # label -> {(metric, label values)} created under it
        self.registry = registry = CollectorRegistry()
        self.success = Counter("ldmole:request_success", "Finished requests, by adapter and finish reason.",
                               ["adapter", "finished_reason"], registry=registry)
        self.failure = Counter("ldmole:request_failure", "Requests that ended in an error, by adapter and HTTP status.",
                               ["adapter", "status"], registry=registry)
        self.prompt_tokens = Counter("ldmole:prompt_tokens", "Prompt tokens of finished requests.", ["adapter"],
                                     registry=registry)
        self.generation_tokens = Counter("ldmole:generation_tokens", "Generated tokens.", ["adapter"],
                                         registry=registry)
        self.ttft = Histogram("ldmole:time_to_first_token_seconds", "Time to the first generated token.",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("ldmole:inter_token_latency_seconds", "Time between generated tokens.",
                             ["adapter"], buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("ldmole:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             ["adapter"], buckets=LATENCY_BUCKETS, registry=registry)
        registry.register(EngineCollector(engine))
        if adapter_selector is not None:
            registry.register(SelectorCollector(adapter_selector))

    def tracker(self, adapter: str) -> RequestTracker:
        """The accounting of one request of an adapter set the server has resolved (never of a name
        it rejected)."""
        if adapter not in self.labelled and len(self.labelled) < self.max_labelled_sets:
            self.labelled.add(adapter)
        return RequestTracker(self, adapter if adapter in self.labelled else OTHER)

    def child(self, metric, *labels):
        self.series.setdefault(labels[0], set()).add((metric, labels))
        return metric.labels(*labels)

    def forget(self, adapter: str) -> None:
        """Drop an unloaded set's series (and free its place under the cap)."""
        for metric, labels in self.series.pop(adapter, ()):
            metric.remove(*labels)
        self.labelled.discard(adapter)


class RequestTracker:
    """Latency and token accounting of one request (all its prompts and samples), fed its outputs."""

    def __init__(self, metrics: ServerMetrics, adapter: str):
        self.m, self.adapter = metrics, adapter
        self.start = self.last = time.perf_counter()
        self.tokens: dict[tuple, int] = {}  # (prompt index, sample index) -> tokens seen
        self.first_seen = False

    def observe(self, prompt_index: int, out) -> None:
        now = time.perf_counter()
        new = 0
        for c in out.outputs:
            key = (prompt_index, c.index)
            new += len(c.token_ids) - self.tokens.get(key, 0)
            self.tokens[key] = len(c.token_ids)
        if new > 0:
            if not self.first_seen:
                self.first_seen = True
                self.m.child(self.m.ttft, self.adapter).observe(now - self.start)
            else:
                gap = (now - self.last) / new
                for _ in range(min(new, 64)):
                    self.m.child(self.m.itl, self.adapter).observe(gap)
            self.last = now
        if out.finished:
            self.m.child(self.m.prompt_tokens, self.adapter).inc(len(out.prompt_token_ids))
            self.m.child(self.m.generation_tokens, self.adapter).inc(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                self.m.child(self.m.success, self.adapter, c.finish_reason or "unknown").inc()

    def finish(self) -> None:
        self.m.child(self.m.e2e, self.adapter).observe(time.perf_counter() - self.start)

    def fail(self, status: int) -> None:
        self.m.child(self.m.failure, self.adapter, str(status)).inc()
