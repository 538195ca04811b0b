"""Incremental detokenisation and stop strings against the tokenizer's own full decode."""

import random

import pytest

from ldmole_runtime.engine.detokenizer import IncrementalDetokenizer, find_stop

TEXTS = ["The café’s crème brûlée — 42 €, naïve 日本語 テキスト 🙂🎉 done.",
         "def f(x):\n    return x ** 2  # comment\n\n\nprint(f(3))",
         "   leading spaces and\ttabs\n"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ldmole_runtime.model.default_base import prepare_default_base

    return AutoTokenizer.from_pretrained(str(prepare_default_base()), local_files_only=True)


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def decode(self, ids, **kw):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, **kw)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    output = tokenizer.encode(text)
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, len(prompt))
    ids, got = list(prompt), ""
    for token in output:  # one token per step, as the engine appends them
        ids.append(token)
        got += detok.delta(ids)
    assert got == tokenizer.decode(output, skip_special_tokens=True)
    assert counting.longest <= 12  # a short window each step, never the whole output


def test_random_tokens_never_lose_text(tokenizer):
    rng = random.Random(0)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(300)]
    detok = IncrementalDetokenizer(tokenizer, 0)
    got = "".join(detok.delta(ids[:i + 1]) for i in range(len(ids)))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full.startswith(got) and len(full) - len(got) <= 4  # only a trailing incomplete character may wait


def test_find_stop_only_looks_at_new_text():
    assert find_stop("hello world", 5, ["world"]) == 6
    assert find_stop("hello world", 3, ["lo w"]) is None  # ended before the new characters
    assert find_stop("abcSTOPdefSTOP", 4, ["STOP"]) == 10
    assert find_stop("xxENDyy", 3, ["END", "Dyy"]) == 2  # END is completed by the new "D": the earliest wins
