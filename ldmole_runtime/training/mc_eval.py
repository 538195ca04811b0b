"""Multiple-choice accuracy by option log-likelihood, defined as lm-eval defines it.

For each question every option's continuation (" " + its text) is scored after the cloze context:
`acc` takes the option with the largest summed log-likelihood, `acc_norm` the largest summed
log-likelihood divided by the option's length in characters (ties: the first, as numpy's argmax).
Scoring runs through the serving engine (`LLM.score_many`: the context once, each option a fork),
on the adapter's current weights.
"""

from __future__ import annotations

from ldmole_runtime.data.datasets import Encoded


def lm_eval_choices(logliks: list[float], option_chars: list[int]) -> tuple[int, int]:
    """(acc's pick, acc_norm's pick)."""
    acc = max(range(len(logliks)), key=logliks.__getitem__)
    normed = [ll / n for ll, n in zip(logliks, option_chars, strict=True)]
    return acc, max(range(len(normed)), key=normed.__getitem__)


def cloze_accuracy(llm, encoded: list[Encoded], adapter: str | None) -> dict:
    """acc / acc_norm over `encoded` (mc cloze encodings), and under "correct" whether each item
    was right (for paired tests between runs on the same items)."""
    results = llm.score_many([(e.options[0], e.options[1]) for e in encoded], adapter=adapter)
    acc, acc_norm = [], []
    for e, result in zip(encoded, results, strict=True):
        pick, pick_norm = lm_eval_choices([c.sum_logprob for c in result.choices], e.options[2])
        acc.append(pick == e.answer)
        acc_norm.append(pick_norm == e.answer)
    n = max(len(encoded), 1)
    return {"accuracy": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "examples": len(encoded),
            "correct": {"acc": acc, "acc_norm": acc_norm}}
