"""A real `ldmole serve`, 24 ordinary clients (completions, chat, streams, scoring): first alone, then
for 60 s beside 8 hostile ones that send, in random order, oversized score requests, disconnects
mid-prefill and mid-stream, huge logit_bias and stop lists, classify floods, tokenize bombs, random
adapter names, slow reads and adapter changes without a key.

The ordinary clients' p99 latency stays within 3x of the first phase and none of their requests
fails; afterwards every KV block is free (the server runs with --debug-check-blocks, so a block
owned by no live sequence would have failed the steps), the metric series are those of the start,
and the server's RSS is within 200 MB of its start."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from live_server import free_port, write_model
from soak_clients import HOSTILE, p99, soak

BASELINE_S, SOAK_S = 10.0, 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    base, adapters = write_model(root)
    (root / "admin.key").write_text("the-admin-key\n")
    port = free_port()
    # fp32: in bf16 the process grows ~370 MB over this soak (oneDNN's bf16 matmul primitives, cached per
    # shape, up to ONEDNN_PRIMITIVE_CACHE_CAPACITY), past the 200 MB this test allows: an open item of issue 24
    cmd = [sys.executable, "-m", "ldmole_cli.main", "serve", "--base", str(base), "--served-model-name", "tiny",
           "--dtype", "float32", "--port", str(port), "--kv-cache-gib", "0.02", "--log-level", "warning",
           "--debug-check-blocks",
           "--enable-adapter-loading", "--adapter-root", str(root), "--admin-key-file", str(root / "admin.key"),
           *[f"--adapter={name}={path}" for name, path in adapters.items()]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, "ldmole serve did not start"
        time.sleep(0.2)
    yield url, proc, adapters
    proc.terminate()
    proc.wait(timeout=60)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def metrics(url: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("ldmole:")}


def test_ordinary_clients_keep_their_latency_beside_hostile_ones(server):
    url, proc, adapters = server
    paths = {name: str(path) for name, path in adapters.items()}

    def phase(seconds: float, hostile_clients: int):
        return asyncio.run(soak(url, seconds, hostile_clients, paths))

    phase(3.0, 0)  # warm up (kernels, caches), not measured
    start_series, start_rss = set(metrics(url)), rss_mb(proc.pid)
    calm, calm_failures, _ = phase(BASELINE_S, 0)
    stormy, stormy_failures, seen = phase(SOAK_S, HOSTILE)
    print(f"\nordinary p99: {p99(calm):.3f} s alone ({len(calm)} requests), {p99(stormy):.3f} s beside hostile "
          f"clients ({len(stormy)} requests; {len(seen)} hostile requests)")
    assert calm_failures == [] and stormy_failures == []
    assert p99(stormy) <= 3 * p99(calm)
    kinds = {name for name, _ in seen}
    assert len(kinds) == 9, kinds  # every kind of attack was made
    assert {status for name, status in seen if name == "keyless_change"} == {(401, 401)}
    assert {status for name, status in seen if name in ("oversized_score", "huge_lists", "tokenize_bomb")} == {400}

    deadline = time.time() + 60
    while time.time() < deadline:  # slow readers' and leavers' requests end
        m = metrics(url)
        if m["ldmole:kv_cache_blocks_in_use"] == 0 and m["ldmole:num_requests_running"] == 0:
            break
        time.sleep(0.2)
    assert m["ldmole:kv_cache_blocks_in_use"] == 0 and m["ldmole:num_requests_waiting"] == 0
    names = httpx.get(url + "/v1/models").json()["data"]
    assert {n["id"] for n in names} == {"tiny", *adapters}  # nobody changed the adapters
    end_series = set(metrics(url))
    labels = {part.split('"')[1] for s in end_series for part in s.split(",") if 'adapter="' in part}
    assert labels <= {"tiny", *adapters}  # no series from a name the server rejected
    assert len(end_series) <= len(start_series) + 40  # new (set, status) pairs of the served sets at most
    assert rss_mb(proc.pid) - start_rss <= 200
    assert httpx.get(url + "/health").status_code == 200
