"""The HTTP server against the engine: the real `openai` client and plain HTTP, answers equal to LLM's."""

import asyncio

import httpx
import pytest
from live_server import BASE_NAME, LiveServer, offline_llm, write_model
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from ldmole_runtime.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def server(model_files):
    with LiveServer(*model_files, admin_key="admin") as srv:
        yield srv


@pytest.fixture(scope="module")
def llm(model_files):
    return offline_llm(*model_files)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def http(server):  # as the server's admin: adapter loading, paths in /v1/models
    with httpx.Client(base_url=server.url, timeout=120, headers=server.admin_headers) as c:
        yield c


PROMPTS = ["The cat sat on", "Once upon a time", "x = 3 + 4;"]


def metrics(http) -> dict:
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(values: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


@pytest.mark.parametrize("model", ["math", "code", None])
def test_greedy_completions_equal_llm_generate(client, llm, model):
    params = SamplingParams(max_tokens=12, temperature=0)
    expected = llm.generate(PROMPTS, params, adapter=model)
    for prompt, exp in zip(PROMPTS, expected, strict=True):
        got = client.completions.create(model=model or BASE_NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == exp.outputs[0].text
        assert got.usage.completion_tokens == len(exp.outputs[0].token_ids)
        assert got.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert got.model == (model or BASE_NAME)


def test_token_id_prompts_and_prompt_lists(client, llm):
    ids = [[5, 6, 7, 8], [40, 41, 42]]
    expected = llm.generate(ids, SamplingParams(max_tokens=6, temperature=0), adapter="math")
    got = client.completions.create(model="math", prompt=ids, max_tokens=6, temperature=0, logprobs=0)
    assert [c.index for c in got.choices] == [0, 1]
    for choice, exp in zip(got.choices, expected, strict=True):
        assert choice.text == exp.outputs[0].text
        assert len(choice.logprobs.token_logprobs) == len(exp.outputs[0].token_ids)


def test_streaming_equals_non_streaming_with_usage(client):
    kwargs = dict(model="code", prompt="Streaming is", max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_seeded_sampling_n_and_stop(client, llm):
    kwargs = dict(model="math", prompt="abc", max_tokens=8, temperature=0.9, top_p=0.95, seed=7, n=3)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    expected = llm.generate(["abc"], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=7, n=3),
                            adapter="math")[0]
    assert [c.text for c in a.choices] == [o.text for o in expected.outputs]
    full = client.completions.create(model="math", prompt="abc", max_tokens=12, temperature=0).choices[0].text
    stop = full[4:6]
    cut = client.completions.create(model="math", prompt="abc", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="math", prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_chat_completion_uses_the_chat_template(client, llm, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    text = server.state.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = server.state.engine.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=9, temperature=0, logprobs=2)
    expected = llm.generate([ids], params, adapter="math")[0].outputs[0]
    got = client.chat.completions.create(model="math", messages=messages, max_completion_tokens=9, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert got.choices[0].message.content == expected.text
    assert got.usage.prompt_tokens == len(ids)
    for entry, exp in zip(got.choices[0].logprobs.content, expected.logprobs, strict=True):
        assert abs(entry.logprob - exp.logprob) < 1e-5 and len(entry.top_logprobs) == 2
    chunks = list(client.chat.completions.create(model="math", messages=messages, max_tokens=9, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text


def test_echo_logprobs_equal_prompt_logprobs(client, llm):
    prompt = "the quick brown fox"
    ids = llm.engine.encode(prompt)
    ref = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), adapter="code")[0]
    got = client.completions.create(model="code", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = got.choices[0].logprobs
    assert got.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) + 1
    for mine, theirs in zip(lp.token_logprobs[1:len(ids)], ref.prompt_logprobs[1:], strict=True):
        assert abs(mine - theirs.logprob) < 1e-5
    for top, theirs in zip(lp.top_logprobs[1:len(ids)], ref.prompt_logprobs[1:], strict=True):
        assert abs(max(top.values()) - max(theirs.top.values())) < 1e-5
    only_prompt = client.completions.create(model="code", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert only_prompt.choices[0].text == prompt and len(only_prompt.choices[0].logprobs.token_logprobs) == len(ids)
    assert only_prompt.usage.completion_tokens == 0


def test_score_equals_llm_score(http, llm):
    context, choices = "Q: which is a colour? A:", [" red", " table", " seven", " rr"]
    for model in ("math", None):
        ref = llm.score(context, choices, adapter=model)
        r = http.post("/v1/score", json={"model": model or BASE_NAME, "context": context, "choices": choices})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["best"] == ref.best and body["best_normalized"] == ref.best_normalized
        for got, exp in zip(body["choices"], ref.choices, strict=True):
            assert abs(got["sum_logprob"] - exp.sum_logprob) < 1e-4
            assert abs(got["mean_logprob"] - exp.mean_logprob) < 1e-4
            assert got["num_tokens"] == exp.num_tokens and got["is_greedy"] == exp.is_greedy
    batch = http.post("/v1/score", json=[{"model": "math", "context": context, "choices": choices},
                                         {"model": "code", "context": [5, 6, 7], "choices": [[8], [9, 10]]}]).json()
    assert batch["object"] == "list" and len(batch["data"]) == 2
    ref = llm.score([5, 6, 7], [[8], [9, 10]], adapter="code")
    assert abs(batch["data"][1]["choices"][1]["sum_logprob"] - ref.choices[1].sum_logprob) < 1e-4


def test_classify_equals_the_score_head(http, server, llm):
    inputs = ["good movie", "bad"]
    r = http.post("/v1/classify", json={"model": "cls", "input": inputs})
    assert r.status_code == 200, r.text
    for item, text in zip(r.json()["data"], inputs, strict=True):
        probs = llm.runtime.classify(llm.engine.encode(text), "cls")
        assert max(abs(a - b) for a, b in zip(item["probs"], probs.tolist(), strict=True)) < 1e-5
        assert item["label"] == int(probs.argmax()) and abs(sum(item["probs"]) - 1) < 1e-5
    no_head = http.post("/v1/classify", json={"model": "math", "input": "x"})
    assert no_head.status_code == 400 and "classification head" in no_head.json()["error"]["message"]


def test_models_tokenizer_health_version(http, server, model_files):
    models = http.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in models}
    assert set(by_id) == {BASE_NAME, "math", "code", "cls"}
    assert by_id["math"]["parent"] == BASE_NAME and by_id["math"]["root"] == str(model_files[1]["math"])
    assert by_id[BASE_NAME]["parent"] is None
    tok = http.post("/tokenize", json={"prompt": "hi there", "add_special_tokens": False}).json()
    assert tok["tokens"] == server.state.engine.tokenizer.encode("hi there", add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "hi there"
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["chat_template"]
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


def test_metrics_move_per_adapter(http, client):
    before = metrics(http)
    client.completions.create(model="code", prompt="metrics", max_tokens=5, temperature=0)
    client.completions.create(model=BASE_NAME, prompt="metrics", max_tokens=3, temperature=0)
    after = metrics(http)
    for adapter, generated in (("code", 5), (BASE_NAME, 3)):
        grew = metric(after, "ldmole:generation_tokens_total", adapter=adapter) - \
            metric(before, "ldmole:generation_tokens_total", adapter=adapter)
        assert grew == generated
        assert metric(after, "ldmole:request_success_total", adapter=adapter) - \
            metric(before, "ldmole:request_success_total", adapter=adapter) == 1
        assert metric(after, "ldmole:time_to_first_token_seconds_count", adapter=adapter) > \
            metric(before, "ldmole:time_to_first_token_seconds_count", adapter=adapter)
    assert metric(after, "ldmole:active_experts_per_token_count", adapter="code") > \
        metric(before, "ldmole:active_experts_per_token_count", adapter="code")
    mean = metric(after, "ldmole:active_experts_per_token_sum", adapter="code") / \
        metric(after, "ldmole:active_experts_per_token_count", adapter="code")
    assert 0 < mean <= 3  # the code set has 3 experts
    for name in ("ldmole:num_requests_running", "ldmole:num_requests_waiting", "ldmole:kv_cache_usage_perc",
                 "ldmole:prefix_cache_hits_total", "ldmole:num_preemptions_total",
                 "ldmole:e2e_request_latency_seconds_count", "ldmole:inter_token_latency_seconds_count"):
        assert any(n == name for n, _ in after), name


def test_load_unload_under_concurrent_traffic(http, server, model_files, llm):
    path = str(model_files[1]["math"])
    expected = llm.generate(["steady"], SamplingParams(max_tokens=20, temperature=0), adapter="code")[0].outputs[0].text

    async def traffic(stop: asyncio.Event) -> list:
        results = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            while not stop.is_set():
                r = await c.post("/v1/completions", json={"model": "code", "prompt": "steady", "max_tokens": 20,
                                                          "temperature": 0})
                results.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))
        return results

    async def churn() -> list:
        statuses = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=server.admin_headers) as c:
            for i in range(4):
                statuses.append((await c.post("/v1/load_lora_adapter",
                                              json={"lora_name": f"extra{i}", "lora_path": path})).status_code)
                # a request in flight on the set being unloaded: unloading waits for it
                gen = asyncio.create_task(c.post("/v1/completions", json={
                    "model": f"extra{i}", "prompt": "in flight", "max_tokens": 30, "temperature": 0,
                    "ignore_eos": True}))
                await asyncio.sleep(0.05)
                statuses.append((await c.post("/v1/unload_lora_adapter", json={"lora_name": f"extra{i}"})).status_code)
                done = await gen
                statuses.append(done.status_code)
                assert done.json()["choices"][0]["finish_reason"] == "length", done.text
        return statuses

    async def main():
        stop = asyncio.Event()
        workers = [asyncio.create_task(traffic(stop)) for _ in range(4)]
        statuses = await churn()
        stop.set()
        return statuses, [r for w in workers for r in await w]

    statuses, results = asyncio.run(main())
    assert statuses == [200] * 12
    assert results and all(r == (200, expected) for r in results)
    assert http.post("/v1/completions", json={"model": "extra0", "prompt": "x"}).status_code == 404
    ref = llm.generate(["in flight"], SamplingParams(max_tokens=5, temperature=0), adapter="math")[0].outputs[0].text
    http.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": path})
    again = http.post("/v1/completions", json={"model": "again", "prompt": "in flight", "max_tokens": 5,
                                               "temperature": 0})
    assert again.json()["choices"][0]["text"] == ref  # the same weights under a new name: the same output
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200


def test_api_key(model_files):
    with LiveServer(*model_files, api_key="sekret") as srv:
        body = {"model": "math", "prompt": "hi", "max_tokens": 2}
        denied = httpx.post(srv.url + "/v1/completions", json=body)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "AuthenticationError"
        ok = OpenAI(base_url=srv.url + "/v1", api_key="sekret").completions.create(**body)
        assert ok.choices[0].text is not None
        assert httpx.get(srv.url + "/health").status_code == 200
        metrics = httpx.get(srv.url + "/metrics")  # open without a key, as scrapers expect
        assert metrics.status_code == 200
        families = {f.name for f in text_string_to_metric_families(metrics.text)}
        assert {"ldmole:request_success", "ldmole:num_requests_running"} <= families
