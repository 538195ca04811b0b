"""Honest comparisons of two evaluations on the same items: a 95% interval for an accuracy and
McNemar's exact test for a paired difference."""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1], sane for small n)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """McNemar's exact test: only the items where exactly one of the two is right count. Under
    "no difference" each such item favours a or b with probability 1/2; p is the two-sided
    binomial tail of the split observed."""
    if len(a) != len(b):
        raise ValueError(f"paired results must cover the same items ({len(a)} != {len(b)})")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    k = min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_a": only_a, "only_b": only_b, "p_value": p}
