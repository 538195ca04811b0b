"""Makes `lm_eval --model ldmole` work: registers the model when lm-eval's registry is imported.

lm-eval 0.4.13 finds models only in a hard-coded table and has no plugin entry point. The package
installs `ldmole_lm_eval.pth`, whose line calls `install()` at every interpreter start-up, so this
module must stay cheap: it imports neither lm-eval nor torch, it only adds an import hook. When
`lm_eval.api.registry` is first imported, the hook lets it finish, imports `lm_eval.models` (which
fills the registry with the built-in models; were ours registered first, the registry would no
longer be empty and lm-eval would never load its own), then registers `ldmole` as a lazy entry:
the model's module is imported only when `--model ldmole` is asked for.

A venv can process the `.pth` twice; `install()` and the registration are both idempotent.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

MODEL_NAME = "ldmole"
ENTRY = "ldmole_eval.harness:LDMoleLM"
_REGISTRY = "lm_eval.api.registry"


def register(registry_module) -> None:
    import lm_eval.models  # noqa: F401  (registers the built-in models first)

    registry = registry_module.model_registry
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=ENTRY)


def _register_safely(module) -> None:
    try:
        register(module)
    except Exception as e:  # a changed lm-eval API must not break lm-eval itself
        warnings.warn(f"ldmole could not register `--model {MODEL_NAME}` with lm-eval: {e!r}", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """The registry's own loader, plus the registration once the module has run."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register_safely(module)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class RegistryWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, RegistryWatcher) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    if any(type(f).__name__ == RegistryWatcher.__name__ for f in sys.meta_path):
        return
    if _REGISTRY in sys.modules:  # lm-eval was imported before us: register right away
        _register_safely(sys.modules[_REGISTRY])
        return
    sys.meta_path.insert(0, RegistryWatcher())
