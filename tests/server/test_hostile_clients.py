"""Requests that would multiply the server's work: each field that does has a limit (a 400 naming it,
with nothing queued), a request's sequences count against the queue when it is created, a refused
score list leaves no work behind, and text is tokenised off the event loop."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import BASE_NAME, LiveServer, idle, wait_idle, write_model

from ldmole_server.state import RequestLimits


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def server(model_files):
    with LiveServer(*model_files, max_queue=40, limits=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


pool = ThreadPoolExecutor(16)


def assert_refused(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


LIMITS = RequestLimits(max_text_chars=50_000)  # the defaults, but text under the test server's 1 MiB body limit
OVER = [  # (path, body, the limit it breaks)
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * (LIMITS.max_stop + 1)}, "max_stop"),
    ("/v1/completions", {"prompt": "hi", "stop": "y" * (LIMITS.max_stop_chars + 1)}, "max_stop_chars"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [5] * (LIMITS.max_stop_token_ids + 1)},
     "max_stop_token_ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "logit_bias": {str(i): 1.0 for i in range(LIMITS.max_logit_bias + 1)}}, "max_logit_bias"),
    ("/v1/completions", {"prompt": "a" * (LIMITS.max_text_chars + 1)}, "max_text_chars"),
    ("/tokenize", {"prompt": "a" * (LIMITS.max_text_chars + 1)}, "max_text_chars"),
    ("/v1/score", {"context": "The sky is", "choices": [" blue"] * 1600}, "max_score_choices"),
    ("/v1/score", [{"context": "a", "choices": ["b", "c"]}] * (LIMITS.max_score_items + 1), "max_score_items"),
    ("/v1/classify", {"model": "cls", "input": ["x"] * (LIMITS.max_classify_inputs + 1)}, "max_classify_inputs"),
]


@pytest.mark.parametrize("path,body,limit", OVER, ids=[case[2] + case[0] for case in OVER])
def test_a_request_over_a_limit_is_a_400_naming_it(http, server, path, body, limit):
    if isinstance(body, dict) and path != "/tokenize":
        body = {"model": BASE_NAME} | body
    assert_refused(http.post(path, json=body), 400, limit, "--" + limit.replace("_", "-"))
    assert idle(server)


def test_requests_at_the_limits_are_served(http):
    r = http.post("/v1/completions", json={
        "model": "math", "prompt": "hi", "max_tokens": 3, "stop": ["zz"] * LIMITS.max_stop,
        "stop_token_ids": [99] * LIMITS.max_stop_token_ids,
        "logit_bias": {str(i): 0.5 for i in range(min(LIMITS.max_logit_bias, 100))}})
    assert r.status_code == 200, r.text
    r = http.post("/v1/score", json={"model": "math", "context": "ab", "choices": ["c"] * 30})
    assert r.status_code == 200, r.text  # 31 sequences: within the queue of 40


def test_score_work_counts_against_the_queue_and_a_refused_list_leaves_none(http, server):
    # more sequences than the queue can ever hold: a 400 that says to split the request
    assert_refused(http.post("/v1/score", json={"model": "math", "context": "ab", "choices": ["c", "d"] * 25}),
                   400, "--max-queue", "split")
    # a list of items that fits the queue alone, but not beside work already waiting: a 503, whole
    items = [{"model": "math", "context": f"context {i}", "choices": ["x", "y", "z"]} for i in range(9)]
    engine = server.state.engine
    gate = threading.Event()  # holds the engine between two steps, so that what arrives waits
    held = asyncio.run_coroutine_threadsafe(engine.call_between_steps(lambda _: gate.wait(60)),
                                            engine._loop_task.get_loop())
    waiting = [pool.submit(httpx.post, f"{server.url}/v1/completions", timeout=120,
                           json={"model": "code", "prompt": f"p{i}", "max_tokens": 2}) for i in range(10)]
    try:
        while engine.num_waiting < 10:
            time.sleep(0.01)
        assert_refused(http.post("/v1/score", json=items), 503, "queue is full")  # 9 x 4 more than the 30 left
    finally:
        gate.set()
    held.result(timeout=60)
    assert [f.result().status_code for f in waiting] == [200] * 10
    wait_idle(server)
    r = http.post("/v1/score", json=items)
    assert r.status_code == 200 and len(r.json()["data"]) == 9
    assert idle(server)


def test_text_is_tokenised_off_the_event_loop(http, server):
    tokenizer = server.engine.tokenizer
    threads = []
    inner = tokenizer.encode

    def encode(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return inner(*args, **kwargs)

    tokenizer.encode = encode
    try:
        for path, body in [
            ("/tokenize", {"prompt": "some text"}),
            ("/v1/completions", {"model": "math", "prompt": "text", "max_tokens": 1}),
            ("/v1/chat/completions", {"model": "math", "max_tokens": 1,
                                      "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/score", {"model": "math", "context": "ab", "choices": ["c", "d"]}),
            ("/v1/classify", {"model": "cls", "input": ["ab", "cd"]}),
        ]:
            assert http.post(path, json=body).status_code == 200, path
    finally:
        del tokenizer.encode
    server_loop_thread = server.thread.name
    assert len(threads) >= 8 and server_loop_thread not in threads, threads


def test_health_fails_when_the_engine_stops_making_progress_and_ready_follows(model_files):
    """A stuck engine (here: a step that never returns) used to leave /health at 200. Liveness now
    fails once work has waited --stall-timeout seconds with no step finishing, and the metric shows
    it; readiness also fails while the queue is full."""
    with LiveServer(*model_files, max_queue=3) as srv:
        srv.state.settings.stall_timeout_s = 0.5
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/ready").status_code == 200
        gate = threading.Event()
        inner = srv.engine.step
        srv.engine.step = lambda: gate.wait(60) and inner()  # the engine hangs in its next step
        try:
            stuck = pool.submit(httpx.post, f"{srv.url}/v1/completions", timeout=120,
                                json={"model": "math", "prompt": "hi", "max_tokens": 2})
            queued = [pool.submit(httpx.post, f"{srv.url}/v1/completions", timeout=120,
                                  json={"model": "math", "prompt": f"q{i}", "max_tokens": 2}) for i in range(2)]
            while srv.state.engine.num_waiting < 3:
                time.sleep(0.01)
            assert httpx.get(srv.url + "/ready").status_code == 503  # the queue is full
            time.sleep(0.7)
            assert httpx.get(srv.url + "/health").status_code == 503
            stalled = [line for line in httpx.get(srv.url + "/metrics").text.splitlines()
                       if line.startswith("ldmole:engine_stalled_seconds")]
            assert float(stalled[0].split()[-1]) > 0.5
        finally:
            gate.set()
        assert stuck.result().status_code == 200 and [f.result().status_code for f in queued] == [200, 200]
        wait_idle(srv)
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/ready").status_code == 200


def test_a_classify_request_stops_when_its_client_leaves(http, server):
    """Classification ran all of a request's inputs as one blocking call that outlived its client; now
    it runs one input per engine pause and stops at the next one after a disconnect."""
    engine = server.engine
    calls = []
    inner = engine.classify

    def slow(token_ids, adapter=None):
        calls.append(1)
        time.sleep(0.1)
        return inner(token_ids, adapter)

    engine.classify = slow
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/classify", json={"model": "cls", "input": ["ab"] * 40}, timeout=0.5)
        time.sleep(1.0)
        done = len(calls)
        time.sleep(0.5)
        assert len(calls) == done < 40  # it stopped, well before the 40th input
    finally:
        del engine.classify
    assert http.post("/v1/classify", json={"model": "cls", "input": ["ab", "cd"]}).status_code == 200
