"""Incremental detokenisation: each step decodes a few tokens around the new ones, never the whole output.

Decoding token by token is wrong for most tokenizers (a byte-level BPE token can hold half of a
UTF-8 character; SentencePiece drops a word's leading space when it starts the decoded text), and
decoding the whole output every step costs O(length) per token. As vLLM and TGI do, we decode a
short window twice: the tokens already emitted as text (`prefix_offset:read_offset`) and the same
window plus the new tokens. The difference is the new text, released once it no longer ends in an
incomplete character.
"""

from __future__ import annotations

# Tokens of context before the first output token, so that its leading space decodes as it would
# inside the full text.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, num_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.read_offset = num_prompt_tokens  # tokens before this one are already text
        self.prefix_offset = max(num_prompt_tokens - _PROMPT_CONTEXT, 0)

    def delta(self, token_ids: list[int]) -> str:
        """New text for the tokens appended since the last call (may be "" while a character is incomplete)."""
        if len(token_ids) <= self.read_offset:
            return ""
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(token_ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full[len(prefix):]


def find_stop(text: str, new_chars: int, stops: list[str]) -> int | None:
    """Where the earliest stop string that ends in the last `new_chars` characters of text starts."""
    best = None
    for stop in stops:
        start = max(len(text) - new_chars - len(stop) + 1, 0)
        at = text.find(stop, start)
        if at >= 0 and (best is None or at < best):
            best = at
    return best
