"""Load: 32 concurrent clients for LDMOLE_LOAD_TEST_S seconds (default 60), mixing adapter sets, streaming
and clients that leave mid-stream, while another adapter set is loaded and unloaded. Nothing fails
but the intended disconnects, and afterwards no request runs and no KV block is in use."""

import asyncio
import json
import os
import random
import statistics
import time

import httpx
import pytest
from live_server import BASE_NAME, LiveServer, write_model
from prometheus_client.parser import text_string_to_metric_families

DURATION_S = float(os.environ.get("LDMOLE_LOAD_TEST_S", "60"))
CLIENTS = 32


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("load"))


def scrape(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


async def client(url: str, seed: int, deadline: float, stats: dict) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while time.monotonic() < deadline:
            model = rng.choice(["math", "code", BASE_NAME])
            body = {"model": model, "prompt": "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(3, 60))),
                    "max_tokens": rng.randrange(1, 40), "temperature": rng.choice([0, 0.8]), "seed": rng.randrange(99)}
            start = time.monotonic()
            kind = rng.choice(["plain", "stream", "stream", "leave"])
            try:
                if kind == "plain":
                    r = await c.post("/v1/completions", json=body)
                    ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                else:
                    ok = False
                    async with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                        if r.status_code != 200:
                            stats["errors"].append(f"stream {r.status_code}")
                            continue
                        async for line in r.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            if kind == "leave":
                                break  # the intended disconnect
                            if line == "data: [DONE]":
                                ok = True
                                break
                            if "error" in json.loads(line[5:]):
                                stats["errors"].append(line)
                                break
                    if kind == "leave":
                        stats["left"] += 1
                        continue
            except httpx.HTTPError as exc:
                stats["errors"].append(repr(exc))
                continue
            if ok:
                stats["latency"].append(time.monotonic() - start)
            else:
                stats["errors"].append(f"{kind} {model}: not completed")


async def churn(url: str, path: str, deadline: float, stats: dict, headers: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as c:
        while time.monotonic() < deadline:
            load = await c.post("/v1/load_lora_adapter", json={"lora_name": "churn", "lora_path": path})
            used = await c.post("/v1/completions", json={"model": "churn", "prompt": "churn", "max_tokens": 8})
            unload = await c.post("/v1/unload_lora_adapter", json={"lora_name": "churn"})
            codes = (load.status_code, used.status_code, unload.status_code)
            stats["churns"] += 1
            if codes != (200, 200, 200):
                stats["errors"].append(f"churn {codes}")
            await asyncio.sleep(0.5)


def test_32_clients_with_disconnects_and_adapter_churn(model_files):
    with LiveServer(*model_files, num_blocks=512, admin_key="admin") as srv:
        stats = {"latency": [], "errors": [], "left": 0, "churns": 0}

        async def run():
            deadline = time.monotonic() + DURATION_S
            await asyncio.gather(churn(srv.url, str(model_files[1]["math"]), deadline, stats, srv.admin_headers),
                                 *(client(srv.url, i, deadline, stats) for i in range(CLIENTS)))

        started = time.monotonic()
        asyncio.run(run())
        elapsed = time.monotonic() - started
        deadline = time.time() + 30
        while time.time() < deadline:
            m = scrape(srv.url)
            if m["ldmole:kv_cache_blocks_in_use"] == 0 and m["ldmole:num_requests_running"] == 0:
                break
            time.sleep(0.1)
        lat = sorted(stats["latency"])
        print(f"\nload test: {CLIENTS} clients, {elapsed:.0f} s: {len(lat)} completed "
              f"({len(lat) / elapsed:.1f} req/s), {stats['left']} intended disconnects, "
              f"{stats['churns']} load/use/unload "
              f"cycles, {len(stats['errors'])} failures; latency p50 {statistics.median(lat):.3f} s "
              f"p99 {lat[int(0.99 * (len(lat) - 1))]:.3f} s; preemptions {m['ldmole:num_preemptions_total']:.0f}")
        assert stats["errors"] == []
        assert len(lat) > CLIENTS and stats["left"] > 0 and stats["churns"] > 0
        assert m["ldmole:kv_cache_blocks_in_use"] == 0 and m["ldmole:num_requests_running"] == 0
        assert m["ldmole:num_requests_waiting"] == 0
        assert srv.state.engine.errored is None and not srv.engine.requests
