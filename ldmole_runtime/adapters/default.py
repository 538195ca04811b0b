"""The embedded default adapter: a real LD-MoLE set trained by `ldmole train` on real data, shipped
in the package so that `make serve` serves it on the default base with no training step.

Its provenance (the exact command, data, and validation figures) lives beside the weights in
assets/default_adapter/PROVENANCE.md. Replacing the default adapter is one change: that folder,
and DEFAULT_ADAPTER_NAME if the task changes.
"""

from __future__ import annotations

from pathlib import Path

from ldmole_runtime.errors import CheckpointError

DEFAULT_ADAPTER_NAME = "social-iqa"
DEFAULT_ADAPTER_DIR = Path(__file__).parent.parent / "assets" / "default_adapter"


def resolve_adapter(path: str | Path) -> Path:
    """An adapter argument as users type it: a folder, or "default" for the embedded adapter."""
    if str(path) == "default":
        if not (DEFAULT_ADAPTER_DIR / "ldmole_adapter.json").is_file():
            raise CheckpointError(f"the embedded default adapter is missing from {DEFAULT_ADAPTER_DIR}; "
                                  "reinstall ldmole")
        return DEFAULT_ADAPTER_DIR
    return Path(path)
