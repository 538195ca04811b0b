"""`ldmole serve` as a user runs it: a subprocess that prints its examples, answers, and on SIGTERM
lets the running stream finish, refuses new work, and exits cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from live_server import free_port, write_model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("shutdown"))


def start(model_files, port, *extra, env=None):
    base, adapters = model_files
    cmd = [sys.executable, "-m", "ldmole_cli.main", "serve", "--base", str(base), "--adapter",
           f"math={adapters['math']}", "--served-model-name", "tiny", "--port", str(port), "--kv-cache-gib", "0.01",
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("ldmole serve did not become healthy")


def test_sigterm_drains_running_streams(model_files):
    port = free_port()
    proc = start(model_files, port, "--drain-timeout", "60")
    url = f"http://127.0.0.1:{port}"
    try:
        lines, sent = [], False
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": "math", "prompt": "drain me", "max_tokens": 150, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    if not sent:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                        sent = True
                        time.sleep(0.5)
                        with pytest.raises(httpx.HTTPError):  # no new connections once draining
                            httpx.post(url + "/v1/completions", json={"model": "math", "prompt": "x"}, timeout=5)
        assert lines[-1] == "data: [DONE]"
        finish = [json.loads(x[5:])["choices"][0]["finish_reason"] for x in lines[:-1]]
        assert finish[-1] == "length" and "".join(json.loads(x[5:])["choices"][0]["text"] for x in lines[:-1])
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "curl -s" in out and "/v1/score" in out  # the ready-to-paste examples
    assert f"{url}/ui" in out  # the routing page


def test_serve_flag_errors_are_one_line(model_files, tmp_path):
    base, _ = model_files
    for args, message in ((["--adapter", "no-equals-sign-here"], "NAME=PATH"),
                          (["--adapter", f"x={tmp_path}/missing"], "missing"),
                          (["--base", str(tmp_path)], "config.json")):
        out = subprocess.run([sys.executable, "-m", "ldmole_cli.main", "serve", "--base", str(base), *args]
                             if args[0] != "--base" else [sys.executable, "-m", "ldmole_cli.main", "serve", *args],
                             capture_output=True, text=True, timeout=120, env=os.environ)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("no_bf16", [False, True])
def test_dtype_auto_is_said_at_start_up_and_in_version(model_files, no_bf16):
    """`--dtype auto`, the default: bf16 where the CPU has bf16 dot products (torch's own CPU probe is the
    oracle), fp32 where it has not or LDMOLE_NO_BF16=1 says so."""
    env = {k: v for k, v in os.environ.items() if k != "LDMOLE_NO_BF16"} | ({"LDMOLE_NO_BF16": "1"} if no_bf16 else {})
    expected = "bfloat16" if torch.cpu._is_avx512_bf16_supported() and not no_bf16 else "float32"
    port = free_port()
    proc = start(model_files, port, env=env)
    try:
        version = httpx.get(f"http://127.0.0.1:{port}/version").json()
        got = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                         json={"model": "math", "prompt": "hello", "max_tokens": 3}).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert version["dtype"] == expected and version["dtype_choice"].startswith(f"{expected} (auto: ")
    assert ("LDMOLE_NO_BF16=1" in version["dtype_choice"]) == no_bf16
    assert f"dtype: {version['dtype_choice']}" in out
    assert got["usage"]["completion_tokens"] == 3  # an fp32-trained set serves in either dtype
