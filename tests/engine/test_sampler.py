"""The sampler against independent computations: torch.topk / log_softmax, a pure-Python penalty
reference, an independently computed nucleus, and empirical distributions of many draws."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from ldmole_runtime.engine.sampler import SamplerOutput, apply_penalties, sample
from ldmole_runtime.engine.sampling_params import SamplingParams
from ldmole_runtime.errors import LDMoleError

V = 50


def fixed_logits(seed: int = 1, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def run(logits, params, prompts=None, outputs=None, generators=None, eos=()) -> SamplerOutput:
    b = logits.shape[0]
    return sample(logits, params, prompts if prompts is not None else [[] for _ in range(b)],
                  outputs if outputs is not None else [[] for _ in range(b)],
                  generators if generators is not None else [None] * b, eos)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(logits_row, p: SamplingParams, n: int, seeded: bool = True) -> torch.Tensor:
    """n draws from one logits row: the row repeated n times, each copy with its own generator."""
    gens = [gen(1000 + i) for i in range(n)] if seeded else [None] * n
    return run(logits_row.expand(n, V), [p] * n, generators=gens).token_ids


def assert_matches_distribution(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Every token's empirical frequency within 5 standard errors of its probability."""
    n = tokens.numel()
    empirical = torch.bincount(tokens, minlength=V).double() / n
    probs = probs.double()
    tolerance = 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-3
    worst = ((empirical - probs).abs() - tolerance).max().item()
    assert worst <= 0, f"empirical distribution off by {worst:.4f} beyond 5 standard errors"


# ---- greedy ---------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = fixed_logits(rows=8)
    out = run(logits, [SamplingParams(temperature=0)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_greedy_rows_stay_exact_in_a_mixed_batch():
    logits = fixed_logits(seed=3, rows=10)
    params = [SamplingParams(temperature=0) if i % 2 == 0 else SamplingParams(temperature=2.0, top_k=20)
              for i in range(10)]
    gens = [None if i % 3 else gen(i) for i in range(10)]
    for _ in range(5):
        out = run(logits, params, generators=gens)
        assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))


def test_low_precision_logits_are_accepted():
    logits = fixed_logits(rows=4)
    out = run(logits.to(torch.bfloat16), [SamplingParams(temperature=0, logprobs=2)] * 4)
    assert torch.equal(out.token_ids, logits.to(torch.bfloat16).float().argmax(-1))
    assert out.logprobs.dtype == torch.float32 and out.top_logprobs.dtype == torch.float32


# ---- logprobs -------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_at_the_chosen_tokens():
    logits = fixed_logits(seed=4, rows=6)
    # temperature, truncation and penalties must not leak into the reported logprobs
    params = [SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.5, frequency_penalty=1.0),
              SamplingParams(temperature=0, presence_penalty=2.0)] * 3
    outputs = [[1, 2, 2, 3]] * 6
    out = run(logits, params, prompts=[[5, 6]] * 6, outputs=outputs, generators=[gen(i) for i in range(6)])
    expected = torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected, rtol=0, atol=1e-6)
    assert out.top_ids is None and out.top_logprobs is None


def test_top_logprobs_use_the_largest_request_of_the_batch():
    logits = fixed_logits(seed=5, rows=4)
    params = [SamplingParams(logprobs=None), SamplingParams(logprobs=0), SamplingParams(temperature=0, logprobs=5),
              SamplingParams(logprobs=3, temperature=0.5)]
    out = run(logits, params, generators=[gen(i) for i in range(4)])
    values, ids = torch.topk(torch.log_softmax(logits, -1), 5)
    assert out.top_ids.shape == (4, 5)
    assert torch.equal(out.top_ids, ids)
    torch.testing.assert_close(out.top_logprobs, values, rtol=0, atol=1e-6)
    assert bool((out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all())


def test_logprobs_zero_gives_an_empty_top_list():
    out = run(fixed_logits(rows=2), [SamplingParams(logprobs=0), SamplingParams()])
    assert out.top_ids.shape == (2, 0) and out.top_logprobs.shape == (2, 0)


# ---- truncation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [SamplingParams(top_k=1, temperature=5.0),
                                    SamplingParams(top_p=1e-6, temperature=5.0),
                                    SamplingParams(min_p=1.0, temperature=5.0)],
                         ids=["top_k=1", "top_p=tiny", "min_p=1"])
def test_degenerate_truncation_is_argmax(params):
    logits = fixed_logits(seed=6, rows=3)
    for r in range(3):
        tokens = draws(logits[r], params, 200)
        assert bool((tokens == logits[r].argmax()).all())


def test_top_k_never_leaves_the_top_k():
    logits = fixed_logits()[0]
    allowed = set(torch.topk(logits, 5).indices.tolist())
    tokens = draws(logits, SamplingParams(top_k=5, temperature=1.5), 1000)
    assert set(tokens.tolist()) == allowed  # inside it, and the whole of it gets drawn


def test_top_k_per_row_in_one_batch():
    logits = fixed_logits()[0]
    ks = [2, 7, 0, 4, -1, 1]  # the largest k of the batch must not leak into the other rows
    n = 600
    params = [SamplingParams(top_k=ks[i % len(ks)]) for i in range(n * len(ks))]
    tokens = run(logits.expand(len(params), V), params, generators=[gen(i) for i in range(len(params))]).token_ids
    for j, k in enumerate(ks):
        drawn = set(tokens[j::len(ks)].tolist())
        if k > 0:
            assert drawn == set(torch.topk(logits, k).indices.tolist())
        else:
            assert len(drawn) > 10


def nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p, in plain Python."""
    ranked = sorted(range(len(probs)), key=lambda t: -float(probs[t]))
    kept, mass = set(), 0.0
    for t in ranked:
        kept.add(t)
        mass += float(probs[t])
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.3, 0.6])
def test_top_p_never_leaves_the_nucleus(top_p):
    logits = fixed_logits()[0]
    probs = torch.softmax(logits.double(), -1)
    allowed = nucleus(probs, top_p)
    tokens = draws(logits, SamplingParams(top_p=top_p), 2000)
    assert set(tokens.tolist()) == allowed
    # and within the nucleus, the renormalised distribution
    kept = torch.zeros(V, dtype=torch.float64)
    kept[list(allowed)] = probs[list(allowed)]
    assert_matches_distribution(tokens, kept / kept.sum())


def test_top_k_then_top_p_on_the_renormalised_rest():
    logits = fixed_logits()[0]
    probs = torch.softmax(logits.double(), -1)
    top8 = torch.topk(probs, 8).indices.tolist()
    rest = torch.zeros(V, dtype=torch.float64)
    rest[top8] = probs[top8] / probs[top8].sum()
    allowed = nucleus(rest, 0.5)
    assert 1 < len(allowed) < 8
    tokens = draws(logits, SamplingParams(top_k=8, top_p=0.5), 3000)
    assert set(tokens.tolist()) == allowed
    kept = torch.zeros(V, dtype=torch.float64)
    kept[list(allowed)] = rest[list(allowed)]
    assert_matches_distribution(tokens, kept / kept.sum())


@pytest.mark.parametrize("truncated", [SamplingParams(top_k=3), SamplingParams(top_k=3, top_p=0.999),
                                       SamplingParams(top_p=0.2), SamplingParams(min_p=0.7)],
                         ids=["top_k", "top_k+top_p", "top_p", "min_p"])
def test_truncation_leaves_other_rows_alone(truncated):
    logits = fixed_logits()[0]
    n = 4000
    params = [truncated if i % 2 == 0 else SamplingParams() for i in range(n)]
    tokens = run(logits.expand(n, V), params, generators=[gen(i) for i in range(n)]).token_ids
    assert len(set(tokens[0::2].tolist())) <= 3
    assert_matches_distribution(tokens[1::2], torch.softmax(logits.double(), -1))


def test_min_p_drops_unlikely_tokens():
    logits = fixed_logits()[0]
    probs = torch.softmax(logits.double(), -1)
    allowed = {t for t in range(V) if probs[t] >= 0.3 * probs.max()}
    assert 1 < len(allowed) < V
    tokens = draws(logits, SamplingParams(min_p=0.3), 1000)
    assert set(tokens.tolist()) == allowed


# ---- distributions --------------------------------------------------------------------------------

def test_plain_sampling_matches_softmax():
    torch.manual_seed(1234)  # unseeded rows use the global RNG
    logits = fixed_logits()[0]
    tokens = draws(logits, SamplingParams(), 20000, seeded=False)
    assert_matches_distribution(tokens, torch.softmax(logits.double(), -1))


def test_temperature_scales_the_distribution():
    torch.manual_seed(4321)
    logits = fixed_logits()[0]
    tokens = draws(logits, SamplingParams(temperature=0.5), 20000, seeded=False)
    assert_matches_distribution(tokens, torch.softmax(logits.double() / 0.5, -1))


def test_seeded_rows_match_softmax_too():
    logits = fixed_logits()[0]
    tokens = draws(logits, SamplingParams(), 5000, seeded=True)
    assert_matches_distribution(tokens, torch.softmax(logits.double(), -1))


# ---- seeds ----------------------------------------------------------------------------------------

def test_same_seed_same_tokens_across_calls():
    logits = fixed_logits(seed=7, rows=4)
    params = [SamplingParams(seed=s) for s in (11, 12, 13, 14)]

    def steps():
        gens = [gen(p.seed) for p in params]
        return torch.stack([run(logits, params, generators=gens).token_ids for _ in range(10)])

    first, second = steps(), steps()
    assert torch.equal(first, second)
    assert len(set(first.flatten().tolist())) > 3  # it does sample, not just repeat one token


def test_seeded_row_ignores_its_batch_neighbours():
    logits = fixed_logits(seed=8, rows=6)
    target = SamplingParams(temperature=1.3, top_p=0.95, seed=0)
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=3, seed=99),
              SamplingParams(frequency_penalty=1.0), SamplingParams(temperature=0.4, seed=5)]
    alone, in_batch = [], []
    for seed in range(40):
        alone.append(run(logits[3:4], [target], generators=[gen(seed)]).token_ids.item())
        params = others[:3] + [target] + others[3:]
        gens = [None, None, gen(99), gen(seed), None, gen(5)]
        in_batch.append(run(logits, params, outputs=[[1, 1, 2]] * 6, generators=gens).token_ids[3].item())
    assert alone == in_batch
    assert len(set(alone)) > 3


def test_sample_seed():
    p = SamplingParams(n=4, seed=123)
    seeds = [p.sample_seed(i) for i in range(4)]
    assert seeds[0] == 123
    assert len(set(seeds)) == 4
    assert seeds == [SamplingParams(n=4, seed=123).sample_seed(i) for i in range(4)]
    assert all(0 <= s < 2**64 for s in seeds)
    gen(seeds[3])  # usable as a torch seed
    assert SamplingParams(n=2).sample_seed(1) is None


# ---- penalties ------------------------------------------------------------------------------------

def reference_penalties(logits: list[float], prompt: list[int], output: list[int], repetition: float,
                        frequency: float, presence: float) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t, count in Counter(output).items():
        out[t] -= frequency * count + presence
    return out


PENALTY_CASES = [  # (prompt, output, repetition, frequency, presence)
    ([1, 2, 3, 3], [4, 4, 4, 5, 1], 1.3, 0.5, 0.7),
    ([7, 8], [], 0.8, 1.0, 1.0),  # repetition < 1 rewards; no output: frequency/presence do nothing
    ([], [9, 9, 10], 1.0, -0.5, 2.0),
    ([11, 12, 13], [13, 14, 14, 14, 14], 2.0, 0.0, -1.5),
    ([20], [21], 1.0, 0.0, 0.0),  # no penalty at all
]


def test_apply_penalties_matches_reference():
    logits = fixed_logits(seed=9, rows=len(PENALTY_CASES)) * 3  # both signs, for the repetition rule
    width_p = max(len(c[0]) for c in PENALTY_CASES)
    width_o = max(len(c[1]) for c in PENALTY_CASES)
    prompts = torch.tensor([c[0] + [-1] * (width_p - len(c[0])) for c in PENALTY_CASES])
    outputs = torch.tensor([c[1] + [V] * (width_o - len(c[1])) for c in PENALTY_CASES])
    got = apply_penalties(logits, prompts, outputs, torch.tensor([c[2] for c in PENALTY_CASES]),
                          torch.tensor([c[3] for c in PENALTY_CASES]), torch.tensor([c[4] for c in PENALTY_CASES]))
    want = torch.tensor([reference_penalties(logits[i].tolist(), *c) for i, c in enumerate(PENALTY_CASES)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(got, logits)


@pytest.mark.parametrize("prompts_as_tensor", [False, True])
def test_penalised_greedy_choice_matches_reference(prompts_as_tensor):
    logits = fixed_logits(seed=10, rows=len(PENALTY_CASES) + 1) * 3
    cases = PENALTY_CASES + [([0, 1], [2, 3], 1.0, 0.0, 0.0)]
    params = [SamplingParams(temperature=0, repetition_penalty=c[2], frequency_penalty=c[3], presence_penalty=c[4])
              for c in cases]
    prompts = [c[0] for c in cases]
    if prompts_as_tensor:
        width = max(map(len, prompts))
        prompts = torch.tensor([p + [-1] * (width - len(p)) for p in prompts])
    out = run(logits, params, prompts=prompts, outputs=[c[1] for c in cases])
    want = torch.tensor([reference_penalties(logits[i].tolist(), *c) for i, c in enumerate(cases)]).argmax(-1)
    assert torch.equal(out.token_ids, want)


def test_penalties_change_the_greedy_choice():
    logits = torch.zeros(3, V)
    logits[:, 7], logits[:, 8] = 2.0, 1.5
    params = [SamplingParams(temperature=0, repetition_penalty=1.5),  # 2 / 1.5 < 1.5
              SamplingParams(temperature=0, frequency_penalty=0.3),  # 2 - 2 * 0.3 < 1.5
              SamplingParams(temperature=0, presence_penalty=0.6)]  # 2 - 0.6 < 1.5
    out = run(logits, params, prompts=[[7], [], []], outputs=[[], [7, 7], [7]])
    assert out.token_ids.tolist() == [8, 8, 8]
    # too little history, or history where that penalty does not look, keeps token 7
    out = run(logits, params, prompts=[[3], [7], [7]], outputs=[[], [7], []])
    assert out.token_ids.tolist() == [7, 7, 7]


# ---- min_tokens -----------------------------------------------------------------------------------

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    eos, stop = 7, 8
    logits = torch.zeros(1, V)
    logits[0, eos], logits[0, stop], logits[0, 9] = 5.0, 4.0, 3.0
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop])
    assert run(logits, [p], outputs=[[1, 2]], eos=[eos]).token_ids.item() == 9
    assert run(logits, [p], outputs=[[1, 2, 3]], eos=[eos]).token_ids.item() == eos
    # ignore_eos: eos is not masked, stop ids still are
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[eos + 20, stop], ignore_eos=True)
    assert run(logits, [p], outputs=[[]], eos={eos}).token_ids.item() == eos
    logits[0, eos] = 0.0
    assert run(logits, [p], outputs=[[]], eos={eos}).token_ids.item() == 9


def test_min_tokens_holds_for_sampled_rows():
    eos = 3
    logits = fixed_logits(rows=1)
    logits[0, eos] = 6.0  # would be drawn most of the time
    p = SamplingParams(min_tokens=5)
    tokens = run(logits.expand(500, V), [p] * 500, outputs=[[0]] * 500,
                 generators=[gen(i) for i in range(500)], eos=[eos, 1000]).token_ids
    assert eos not in tokens.tolist()
    tokens = run(logits.expand(500, V), [p] * 500, outputs=[[0] * 5] * 500,
                 generators=[gen(i) for i in range(500)], eos=[eos]).token_ids
    p_eos = torch.softmax(logits[0].double(), -1)[eos].item()
    assert abs((tokens == eos).double().mean().item() - p_eos) < 5 * math.sqrt(p_eos * (1 - p_eos) / 500)


# ---- SamplingParams -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0, got -1"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(max_tokens=-1), "max_tokens must be >= 0, got -1"),
    (dict(max_tokens=2.5), "max_tokens must be an integer or None"),
    (dict(top_p=0), "top_p must be in (0, 1], got 0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-2), "top_k must be >= -1"),
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
    (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2], got -3"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(logprobs=21), "logprobs must be in [0, 20], got 21"),
    (dict(prompt_logprobs=-1), "prompt_logprobs must be in [0, 20], got -1"),
    (dict(seed="7"), "seed must be an integer or None"),
    (dict(seed=2**64), "seed must be in"),
    (dict(stop=[1]), "stop must be a string or a list of strings"),
    (dict(stop=[""]), "stop strings must not be empty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of non-negative integers"),
    (dict(min_tokens=-1), "min_tokens must be >= 0"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens must be <= max_tokens"),
    (dict(ignore_eos="yes"), "ignore_eos must be true or false"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(LDMoleError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_sampling_params_normalisation():
    p = SamplingParams(stop="###", temperature=0, top_k=-1, max_tokens=None, seed=5, logprobs=0)
    assert p.stop == ["###"] and p.greedy and p.max_tokens is None
    assert not SamplingParams(temperature=0.01).greedy
    assert SamplingParams(temperature=1e-7).greedy  # too small to divide by: greedy
    assert math.isclose(SamplingParams(temperature=1).temperature, 1.0)
