"""A model folder's tokenizer: the one way ldmole loads one (from disk only; no hub is reachable)."""

from __future__ import annotations

from pathlib import Path

from ldmole_runtime.errors import LDMoleError


def load_tokenizer(folder: str | Path, needed_for: str | None = None):
    """The folder's tokenizer. Without one: None (token ids only, e.g. a test model), or, when
    `needed_for` says what needs it, an LDMoleError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        if needed_for is None:
            return None
        raise LDMoleError(f"{folder}: {needed_for} needs a tokenizer there ({exc})") from None
