"""Errors the runtime raises for bad user input.

Everything a user can get wrong (a path, a file, a checkpoint that does not fit its base) is
reported as one of these, with a message that names the file or field, so the CLI and the server
can show it instead of a traceback from deep inside torch.
"""


class LDMoleError(Exception):
    """Base class for every user-facing error of the runtime."""


class CheckpointError(LDMoleError):
    """A model or adapter folder is missing, unreadable, corrupt or inconsistent."""


class AdapterMismatchError(LDMoleError):
    """An adapter set does not fit the base model it is loaded on."""


class UnsupportedModelError(LDMoleError):
    """The base model's architecture or an option in its config is not supported."""


class UnknownAdapterError(LDMoleError):
    """A request names an adapter set that is not loaded (or no longer is)."""


class PromptTooLongError(LDMoleError):
    """A prompt does not fit the model's context (max_model_len)."""


class EngineOverloadedError(LDMoleError):
    """The engine's queue is full, or it is draining for shutdown: try again later."""


class StepFailedError(Exception):
    """A step of the engine failed; only the requests in that step fail, with this as the cause.

    Not an LDMoleError: it is the server's fault, not the user's."""
