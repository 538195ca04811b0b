"""S-LoRA's serving workload (S-LoRA/S-LoRA, benchmarks/trace.py), against a running ldmole server.

The trace, as S-LoRA generates it:
* the adapter of a request is floor(numpy.random.power(alpha) · n): a power-law over the n sets
  (not Zipf); alpha = 1 is uniform, a smaller alpha favours the low indices;
* arrivals are a gamma process with shape 1/cv² and scale cv²/rate (cv = 1: Poisson);
* prompt and output lengths are uniform in the ranges given (S-LoRA uses [8, 512)).

Requests are sent open-loop, each at its arrival time, whatever the server's progress, so a server
that falls behind shows it in TTFT and latency, as in S-LoRA's figures. Prompts are token ids, so
their lengths are exact; outputs ignore EOS, so their lengths are too.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from ldmole_cli.bench_serve import percentile


@dataclass(frozen=True)
class TraceRequest:
    at: float  # seconds after the start
    adapter: int  # index into the served sets
    input_len: int
    output_len: int


def slora_trace(num_adapters: int, alpha: float, rate: float, cv: float, duration: float,
                input_range: tuple[int, int], output_range: tuple[int, int], seed: int = 0) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    total = int(rate * duration)
    adapters = np.minimum((rng.power(alpha, total) * num_adapters).astype(int), num_adapters - 1)
    inputs = rng.integers(input_range[0], input_range[1], total)
    outputs = rng.integers(output_range[0], output_range[1], total)
    arrivals = np.cumsum(rng.gamma(1.0 / (cv * cv), cv * cv / rate, total))
    return [TraceRequest(float(t), int(a), int(i), int(o))
            for t, a, i, o in zip(arrivals, adapters, inputs, outputs, strict=True)]


_SERIES = re.compile(r'^(ldmole:adapter_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', re.M)


def adapter_counters(url: str, headers: dict) -> dict[str, float]:
    """The server's adapter-tier series from /metrics, e.g. 'ldmole:adapter_loads_total{source="disk"}'."""
    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    return {name + (labels or ""): float(value) for name, labels, value in _SERIES.findall(text)}


async def _send(client: httpx.AsyncClient, model: str, req: TraceRequest, index: int, start: float, out: list):
    await asyncio.sleep(max(0.0, start + req.at - time.perf_counter()))
    sent = time.perf_counter()
    rng = random.Random(index)  # a prompt of its own: no request finds another's prefix in the cache
    prompt = [rng.randrange(3, 90) for _ in range(req.input_len)]  # ids every vocabulary has (tests: 100)
    body = {"model": model, "prompt": prompt, "max_tokens": req.output_len, "temperature": 0, "ignore_eos": True,
            "stream": True}
    first = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.append({"ok": False, "status": r.status_code, "body": (await r.aread()).decode()[:200]})
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    out.append({"ok": False, "status": 200, "body": line[:200]})
                    return
                if chunk.get("choices"):
                    first = first or time.perf_counter()
                    tokens += 1
    except httpx.HTTPError as exc:
        out.append({"ok": False, "status": None, "body": str(exc)[:200]})
        return
    done = time.perf_counter()
    out.append({"ok": True, "ttft": (first or done) - sent, "latency": done - sent, "tokens": tokens,
                "input_len": req.input_len})


def run_slora(url: str, num_adapters: int, alpha: float, rate: float, cv: float, duration: float,
              input_range: tuple[int, int], output_range: tuple[int, int], api_key: str | None, seed: int = 0,
              server_pid: int | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models = httpx.get(url + "/v1/models", headers=headers, timeout=60).json()["data"]
    names = sorted(m["id"] for m in models if m["parent"] is not None)
    if len(names) < num_adapters:
        raise ValueError(f"the server serves {len(names)} adapter sets; --num-adapters asks for {num_adapters}")
    names = names[:num_adapters]
    trace = slora_trace(num_adapters, alpha, rate, cv, duration, input_range, output_range, seed)
    before = adapter_counters(url, headers)

    async def drive() -> tuple[list, float]:
        out: list = []
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=3600, headers=headers, limits=limits) as client:
            start = time.perf_counter()
            await asyncio.gather(*(_send(client, names[r.adapter], r, i, start, out) for i, r in enumerate(trace)))
            return out, time.perf_counter() - start

    results, elapsed = asyncio.run(drive())
    after = adapter_counters(url, headers)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if not k.endswith("_bucket") and "{le=" not in k}
    ok = [r for r in results if r["ok"]]
    hits, misses = delta.get("ldmole:adapter_slot_hits_total", 0.0), delta.get("ldmole:adapter_slot_misses_total", 0.0)
    report = {
        "workload": {"num_adapters": num_adapters, "alpha": alpha, "rate": rate, "cv": cv, "duration_s": duration,
                     "input_range": list(input_range), "output_range": list(output_range), "requests": len(trace)},
        "wall_s": elapsed, "completed": len(ok), "failed": len(results) - len(ok),
        "failures": [r for r in results if not r["ok"]][:5],
        "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "ttft_p50_s": percentile([r["ttft"] for r in ok], 0.5), "ttft_p90_s": percentile([r["ttft"] for r in ok], 0.9),
        "ttft_p99_s": percentile([r["ttft"] for r in ok], 0.99),
        "latency_p50_s": percentile([r["latency"] for r in ok], 0.5),
        "latency_p99_s": percentile([r["latency"] for r in ok], 0.99),
        "slot_hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
        "loads_disk": delta.get('ldmole:adapter_loads_total{source="disk"}', 0.0),
        "loads_host": delta.get('ldmole:adapter_loads_total{source="host"}', 0.0),
        "evictions": delta.get("ldmole:adapter_evictions_total", 0.0),
    }
    if server_pid is not None:  # the server's peak resident memory (Linux)
        status = Path(f"/proc/{server_pid}/status").read_text()
        report["server_peak_rss_mib"] = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    return report


def make_adapter_copies(like, count: int, out: Path, noise: float, seed: int = 0) -> list[Path]:
    """`count` servable sets in out/set-0000 ...: copies of `like` (an AdapterSet) with every tensor
    perturbed by Gaussian noise of `noise` times its own standard deviation, so each set routes and
    computes a little differently, as adapters trained from one recipe do."""
    from ldmole_runtime.adapters.adapter_set import AdapterSet

    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        tensors = {k: (v + noise * (v.float().std() if v.numel() > 1 else v.abs()) * torch.randn(v.shape, generator=g))
                   .to(v.dtype) for k, v in like.tensors.items()}  # in the set's own dtype: the same bytes on disk
        paths.append(AdapterSet(like.config, tensors).save(out / f"set-{i:04d}"))
    return paths
