"""The clients of the hostile soak (tests/server/test_hostile_soak.py and, under Ray Serve,
tests/server/test_cluster.py): ordinary ones that must be served, and hostile ones that try, in
random order, every way found to stall, leak or take over the server."""

import asyncio
import json
import random
import time

import httpx

ORDINARY, HOSTILE = 24, 8
MODEL = "math"


async def ordinary(c: httpx.AsyncClient, rng: random.Random, until: float, latencies: list, failures: list):
    while time.monotonic() < until:
        kind = rng.choice(["completion", "chat", "stream", "score"])
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(4, 40)))
        start = time.monotonic()
        try:
            if kind == "completion":
                r = await c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8})
                ok = r.status_code == 200
            elif kind == "chat":
                r = await c.post("/v1/chat/completions", json={"model": "code", "max_tokens": 8,
                                                               "messages": [{"role": "user", "content": prompt}]})
                ok = r.status_code == 200
            elif kind == "score":
                r = await c.post("/v1/score", json={"model": MODEL, "context": prompt, "choices": [" a", " bc", " d"]})
                ok = r.status_code == 200
            else:
                ok = False
                async with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                                     "max_tokens": 8, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        ok = ok or line == "data: [DONE]"
                        if line.startswith("data: {") and "error" in json.loads(line[6:]):
                            break
        except httpx.HTTPError as exc:
            failures.append(f"{kind}: {exc!r}")
            continue
        if ok:
            latencies.append(time.monotonic() - start)
        else:
            failures.append(f"{kind}: {r.status_code}")


async def hostile(c: httpx.AsyncClient, rng: random.Random, until: float, paths: dict, seen: list):
    async def oversized_score():
        return await c.post("/v1/score", json={"model": MODEL, "context": "x" * 21, "choices": ["y" * 40] * 1600})

    async def leave_mid_prefill():
        try:
            await c.post("/v1/score", json={"model": MODEL, "context": "z" * 200, "choices": ["a", "b"]},
                         timeout=0.05)
        except httpx.TimeoutException:
            return "left"

    async def leave_mid_stream():
        async with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "long", "max_tokens": 200,
                                                             "ignore_eos": True, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return "left"

    async def huge_lists():
        return await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "stop": ["s"] * 100_000,
                                                     "logit_bias": {str(i): 1.0 for i in range(100)} | {"0": 1}})

    async def classify_flood():
        return await c.post("/v1/classify", json={"model": "cls", "input": ["some words"] * 64})

    async def tokenize_bomb():
        return await c.post("/tokenize", json={"prompt": "bomb " * 400_000})  # 2 MB: over --max-text-chars

    async def random_name():
        name = "".join(rng.choice("abc\x00\n\u202e/.") for _ in range(8))
        return await c.post("/v1/completions", json={"model": name, "prompt": "hi"})

    async def slow_reader():
        async with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "slow", "max_tokens": 60,
                                                             "ignore_eos": True, "stream": True}) as r:
            async for _ in r.aiter_lines():
                await asyncio.sleep(0.2)

    async def keyless_change():
        load = await c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": paths[MODEL]})
        unload = await c.post("/v1/unload_lora_adapter", json={"lora_name": MODEL, "force": True})
        return load.status_code, unload.status_code

    attacks = [oversized_score, leave_mid_prefill, leave_mid_stream, huge_lists, classify_flood, tokenize_bomb,
               random_name, slow_reader, keyless_change]
    while time.monotonic() < until:
        attack = rng.choice(attacks)
        try:
            result = await attack()
        except httpx.HTTPError as exc:
            result = repr(exc)
        seen.append((attack.__name__, getattr(result, "status_code", result)))
        await asyncio.sleep(rng.uniform(0.05, 0.3))


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[int(0.99 * (len(values) - 1))]


async def soak(url: str, seconds: float, hostile_clients: int, paths: dict, ordinary_clients: int = ORDINARY):
    """Ordinary and hostile clients for `seconds`: (ordinary latencies, ordinary failures, hostile results)."""
    latencies, failures, seen = [], [], []
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(*(ordinary(c, random.Random(i), until, latencies, failures)
                               for i in range(ordinary_clients)),
                             *(hostile(c, random.Random(100 + i), until, paths, seen) for i in range(hostile_clients)))
    return latencies, failures, seen
