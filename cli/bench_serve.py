"""`ldmole bench-serve`: drive a running server with N concurrent streaming clients over a
mixed-adapter workload, and run the same workload through the offline engine in the same process,
alternating, so the HTTP/offline throughput ratio compares like with like on a noisy machine.

Every request has a fixed length (ignore_eos, greedy), so both sides generate the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import httpx

WORDS = ("the a of to and in is was for on that with as by at from it this be are or an which "
         "plant water energy light heat animal earth rock cell food air sun moon star").split()


@dataclass
class Workload:
    prompts: list[str]
    models: list[str]  # the `model` field of each request
    max_tokens: int


def make_workload(models: list[str], num_requests: int, prompt_words: int, max_tokens: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) for _ in range(num_requests)]
    return Workload(prompts, [models[i % len(models)] for i in range(num_requests)], max_tokens)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(int(q * (len(values) - 1) + 0.5), len(values) - 1)]


async def run_http(url: str, work: Workload, concurrency: int, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ttft, itl, tokens, failures = [], [], 0, 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(work.prompts)):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": work.models[i], "prompt": work.prompts[i], "max_tokens": work.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            start = last = time.perf_counter()
            first = True
            try:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        failures += 1
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data:") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[5:])
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
                        if not chunk.get("choices"):
                            continue
                        now = time.perf_counter()
                        (ttft if first else itl).append(now - (start if first else last))
                        first, last = False, now
            except httpx.HTTPError:
                failures += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"requests_per_s": (len(work.prompts) - failures) / elapsed, "output_tokens_per_s": tokens / elapsed,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_s": percentile(itl, 0.5), "itl_p99_s": percentile(itl, 0.99),
            "failed": failures, "wall_s": elapsed}


def run_offline(llm, work: Workload, concurrency: int, base_name: str) -> dict:
    from ldmole_runtime.engine.sampling_params import SamplingParams

    llm.engine.scheduler.max_num_seqs = concurrency  # the same cap on concurrent sequences as the HTTP clients
    params = SamplingParams(max_tokens=work.max_tokens, temperature=0, ignore_eos=True)
    adapters = [None if m == base_name else m for m in work.models]
    started = time.perf_counter()
    outs = llm.generate(work.prompts, params, adapter=adapters)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests_per_s": len(outs) / elapsed, "output_tokens_per_s": tokens / elapsed, "wall_s": elapsed}


def offline_llm_like(url: str, api_key: str | None):
    """An LLM over the same base and adapter folders the server reports in /v1/models."""
    from ldmole_runtime.engine.llm import LLM

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"]
    base = next(m for m in models if m["parent"] is None)
    adapters = {m["id"]: m["root"] for m in models if m["parent"] is not None}
    return LLM(base["root"], adapters=adapters), base["id"], [base["id"]] + list(adapters)


def bench_serve(url: str, concurrencies: list[int], num_requests: int | None, prompt_words: int, max_tokens: int,
                rounds: int, api_key: str | None) -> dict:
    llm, base_name, models = offline_llm_like(url, api_key)
    results = {}
    for c in concurrencies:
        work = make_workload(models, num_requests or max(2 * c, 8), prompt_words, max_tokens, seed=c)
        def run_http_sync(work=work, c=c):
            return asyncio.run(run_http(url, work, c, api_key))

        run_http_sync()  # warm-up of both sides: later rounds find the same prompts in either prefix cache
        run_offline(llm, work, c, base_name)
        http_runs, offline_runs = [], []
        for _ in range(rounds):  # alternate, so drift in machine speed hits both sides alike
            http_runs.append(run_http_sync())
            offline_runs.append(run_offline(llm, work, c, base_name))
        med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
        http = {k: med(http_runs, k) for k in http_runs[0]}
        offline = {k: med(offline_runs, k) for k in offline_runs[0]}
        ratios = [
            h["output_tokens_per_s"] / o["output_tokens_per_s"] for h, o in zip(http_runs, offline_runs, strict=True)
        ]
        results[str(c)] = {"http": http, "offline": offline,
                           "http_over_offline_throughput": http["output_tokens_per_s"] / offline["output_tokens_per_s"],
                           "per_round": {"http_tokens_per_s": [r["output_tokens_per_s"] for r in http_runs],
                                         "offline_tokens_per_s": [r["output_tokens_per_s"] for r in offline_runs],
                                         "ratio": ratios},
                           "requests": len(work.prompts)}
    return {"url": url, "models": models, "max_tokens": max_tokens, "prompt_words": prompt_words, "rounds": rounds,
            "concurrency": results}


def add_bench_serve_flags(b) -> None:
    b.add_argument("--url", default="http://127.0.0.1:8000", help="the running server (default http://127.0.0.1:8000)")
    b.add_argument("--concurrency", default="1,8,32",
                   help="comma-separated numbers of concurrent clients (default 1,8,32)")
    b.add_argument("--num-requests", type=int, help="requests per concurrency level (default max(2 x concurrency, 8))")
    b.add_argument("--prompt-words", type=int, default=48, help="words per random prompt (default 48)")
    b.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request, EOS ignored (default 32)")
    b.add_argument("--rounds", type=int, default=3,
                   help="alternating HTTP/offline rounds per level; medians reported (default 3)")
    b.add_argument("--api-key", help="the server's API key, if it has one")
    b.add_argument("--workload", choices=["closed", "slora"], default="closed",
                   help="closed: N concurrent clients, HTTP against the offline engine (default); slora: S-LoRA's "
                        "open-loop trace over many adapter sets (power-law set choice, gamma arrivals)")
    s = b.add_argument_group("slora workload")
    s.add_argument("--num-adapters", type=int, default=100, help="sets the trace chooses from: the first N the "
                   "server lists, by name (default 100)")
    s.add_argument("--alpha", type=float, default=1.0,
                   help="power-law exponent of the set choice: 1 is uniform, smaller favours few sets (default 1)")
    s.add_argument("--rate", type=float, default=1.0, help="mean requests per second (default 1)")
    s.add_argument("--cv", type=float, default=1.0,
                   help="coefficient of variation of inter-arrival times: 1 is Poisson, more is burstier (default 1)")
    s.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (default 60)")
    s.add_argument("--input-range", default="8,64", help="prompt tokens, uniform in [LOW, HIGH) (default 8,64)")
    s.add_argument("--output-range", default="8,32", help="output tokens, uniform in [LOW, HIGH) (default 8,32)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the trace (default 0)")
    s.add_argument("--server-pid", type=int, help="the server's process id: report its peak resident memory")
    b.add_argument("--json", action="store_true", help="print one JSON object on one line")
