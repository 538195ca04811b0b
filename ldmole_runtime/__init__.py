"""ldmole: serving runtime for LD-MoLE adapters (mixtures of LoRA experts with learned dynamic routing)."""

import importlib.metadata as _metadata

from ldmole_runtime.adapters.adapter_set import AdapterSet, load_reference
from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.errors import AdapterMismatchError, CheckpointError, LDMoleError, UnsupportedModelError
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.model.runtime import ForwardOutput, LDMoleRuntime

__all__ = [
    "AdapterSet", "new_adapter_set", "load_reference", "ModelConfig", "LDMoleRuntime", "ForwardOutput",
    "LDMoleError", "CheckpointError", "AdapterMismatchError", "UnsupportedModelError",
]

try:
    __version__ = _metadata.version("ldmole")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+source"
