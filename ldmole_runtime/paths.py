"""Where ldmole keeps what it builds or converts once per machine (the default base, the C kernel)."""

from __future__ import annotations

import os
import pathlib


def default_cache_dir() -> pathlib.Path:
    """``$LDMOLE_CACHE`` if set, else ``~/.cache/ldmole``."""
    env = os.environ.get("LDMOLE_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "ldmole"
