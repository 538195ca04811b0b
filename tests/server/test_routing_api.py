"""`"ldmole": {"routing": ...}` on the HTTP API, through the real `openai` client: each choice's
per-token routing equals what a plain forward over the same tokens records (`ldmole forward`'s
capture), streamed or not; the bare base says it has none."""

import httpx
import pytest
import torch
from live_server import BASE_NAME, LiveServer, offline_llm, write_model
from openai import OpenAI

from ldmole_runtime.adapters.spec import ALL_PROJECTIONS
from ldmole_runtime.engine.sampling_params import SamplingParams

PROMPT = [5, 9, 11, 3, 7, 2, 8, 14]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("routing"))


@pytest.fixture(scope="module")
def server(model_files):
    with LiveServer(*model_files) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def llm(model_files):
    return offline_llm(*model_files)


def reference(llm, adapter, max_tokens):
    """The greedy continuation (the server's, as test_server_api holds) and a plain forward's routing
    over prompt + continuation: key -> [T, E]."""
    out = llm.generate([PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                       adapter=adapter)[0]
    tokens = PROMPT + out.outputs[0].token_ids
    fwd = llm.engine.runtime.forward(torch.tensor([tokens]), adapters=adapter, capture_routing=True)
    return tokens, {k: v[0] for k, v in fwd.routing.items()}, {k: v[0] for k, v in fwd.lambdas.items()}


def check_counts(routing, tokens, expected, first_position):
    for t, entry in enumerate(tokens):
        position = first_position + t
        for layer, row in enumerate(entry):
            for proj, count in zip(routing["projections"], row, strict=True):
                assert count == int((expected[f"{layer}.{proj}"][position] > 0).sum()), (t, layer, proj)


def test_counts_with_echo_match_the_forward(client, llm):
    tokens, expected, _ = reference(llm, "math", 5)
    got = client.completions.create(model="math", prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True, "ldmole": {"routing": "counts"}})
    routing = got.choices[0].model_extra["ldmole"]["routing"]
    assert routing["format"] == "counts" and routing["experts"] == 4 and routing["router"] == "sparsegen"
    assert routing["projections"] == list(ALL_PROJECTIONS)
    assert routing["layers"] == llm.engine.runtime.cfg.num_layers
    assert len(routing["tokens"]) == len(tokens) == len(PROMPT) + 5
    assert routing["tokens"][0] is None  # the first prompt token: no position chose it
    check_counts(routing, routing["tokens"][1:], expected, 0)  # token j: the routing at position j - 1


def test_streamed_weights_match_the_forward(client, llm):
    tokens, expected, lambdas = reference(llm, "code", 6)
    stream = client.completions.create(model="code", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "ldmole": {"routing": "weights"}})
    entries, projections = [], None
    for chunk in stream:
        for choice in chunk.choices:
            routing = choice.model_extra["ldmole"]["routing"]
            projections = routing["projections"]
            entries += routing["tokens"]
    assert projections == ["k_proj", "v_proj", "up_proj"]
    assert len(entries) == 6
    for t, entry in enumerate(entries):
        position = len(PROMPT) - 1 + t
        for layer, row in enumerate(entry):
            for proj, cell in zip(projections, row, strict=True):
                want = expected[f"{layer}.{proj}"][position]
                assert cell["experts"] == torch.nonzero(want > 0).flatten().tolist()
                assert torch.allclose(torch.tensor(cell["p"]), want[want > 0], atol=1e-5)
                assert cell["lambda"] == pytest.approx(float(lambdas[f"{layer}.{proj}"][position]), abs=1e-5)


def test_chat_carries_routing_per_generated_token(client):
    got = client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi there"}],
                                         max_tokens=4, temperature=0,
                                         extra_body={"ignore_eos": True, "ldmole": {"routing": "counts"}})
    routing = got.choices[0].model_extra["ldmole"]["routing"]
    assert len(routing["tokens"]) == got.usage.completion_tokens == 4
    assert all(1 <= c <= 4 for entry in routing["tokens"] for row in entry for c in row)


def test_the_bare_base_says_it_has_no_routing_and_off_means_absent(client):
    got = client.completions.create(model=BASE_NAME, prompt=PROMPT, max_tokens=2,
                                    extra_body={"ldmole": {"routing": "counts"}})
    assert "bare base" in got.choices[0].model_extra["ldmole"]["routing"]["none"]
    plain = client.completions.create(model="math", prompt=PROMPT, max_tokens=2)
    assert "ldmole" not in (plain.choices[0].model_extra or {})


def test_an_unknown_routing_format_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="math", prompt=PROMPT, max_tokens=2, extra_body={"ldmole": {"routing": "all"}})


def test_routing_is_bounded_per_request(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="at most 2048 tokens"):
        client.completions.create(model="math", prompt=PROMPT, max_tokens=300, n=8,
                                  extra_body={"ldmole": {"routing": "weights"}})
    with pytest.raises(openai.BadRequestError, match="needs max_tokens"):
        client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"ldmole": {"routing": "counts"}})


def test_score_returns_each_choice_tokens_routing(server, llm):
    """Each choice token's entry is the routing at the position before it: the shared context's last
    position for the first token (read off the held context), the fork's own positions after it."""
    context, choices = PROMPT, [[20, 21, 22], [30], [40, 41]]
    body = {"model": "math", "context": context, "choices": choices, "ldmole": {"routing": "counts"}}
    got = httpx.post(server.url + "/v1/score", json=body, timeout=60).json()
    for choice, ids in zip(got["choices"], choices, strict=True):
        routing = choice["ldmole"]["routing"]
        assert len(routing["tokens"]) == len(ids) == choice["num_tokens"]
        fwd = llm.engine.runtime.forward(torch.tensor([context + ids]), adapters="math", capture_routing=True)
        check_counts(routing, routing["tokens"], {k: v[0] for k, v in fwd.routing.items()}, len(context) - 1)
