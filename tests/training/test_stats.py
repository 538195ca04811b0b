"""The comparison statistics against scipy's own implementations."""

import random

import pytest
from scipy import stats

from ldmole_runtime.training.stats import mcnemar, wilson_interval


@pytest.mark.parametrize("correct, n", [(0, 10), (3, 10), (10, 10), (487, 1954), (1000, 1954), (1, 1)])
def test_wilson_interval_matches_scipy(correct, n):
    ci = stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(correct, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    g = random.Random(0)
    for n, bias in ((40, 0.5), (300, 0.6), (1954, 0.55), (25, 0.9)):
        a = [g.random() < 0.5 for _ in range(n)]
        b = [x if g.random() < 0.6 else g.random() < bias for x in a]
        res = mcnemar(a, b)
        only_a = sum(x and not y for x, y in zip(a, b, strict=True))
        only_b = sum(y and not x for x, y in zip(a, b, strict=True))
        assert (res["only_a"], res["only_b"]) == (only_a, only_b)
        assert res["p_value"] == pytest.approx(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])
