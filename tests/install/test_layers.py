"""The architecture as a test: every import statement of the project (inside functions too) points
down the layers, and no module imports itself back through others.

    kernels -> base (errors, paths, data) -> lora / model / adapters -> engine
            -> server / eval / training -> the application (cli/)

Modules of one layer may import each other; `server`, `eval` and `training` are three separate
wings of one layer and do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"kernels": "ldmole_kernels", "ldmole_runtime": "ldmole_runtime", "server": "ldmole_server",
           "eval": "ldmole_eval", "cli": "ldmole_cli"}

# (module prefix, layer, wing); the longest matching prefix decides
LAYERS = [
    ("ldmole_kernels", 0, None),
    ("ldmole_runtime.errors", 1, None),
    ("ldmole_runtime.paths", 1, None),
    ("ldmole_runtime.data", 1, None),
    ("ldmole_runtime", 2, None),  # the package root re-exports the model layer's API
    ("ldmole_runtime.lora", 2, None),
    ("ldmole_runtime.model", 2, None),
    ("ldmole_runtime.adapters", 2, None),
    ("ldmole_runtime.engine", 3, None),
    ("ldmole_server", 4, "server"),
    ("ldmole_eval", 4, "eval"),
    ("ldmole_runtime.training", 4, "training"),
    ("ldmole_cli", 5, None),
]


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, name in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [name, *path.relative_to(REPO / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules this one imports, anywhere in its body."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from pkg import name`: the module that holds name
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def layer_of(module: str) -> tuple[int, str | None]:
    prefix, layer, wing = max(((p, lay, w) for p, lay, w in LAYERS if module == p or module.startswith(p + ".")),
                              key=lambda entry: len(entry[0]))
    return layer, wing


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    assert len(modules) > 80 and "ldmole_kernels.cpu_kernels" in modules and "ldmole_cli.main" in modules
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_imports_point_down(graph):
    upward = []
    for module, targets in graph.items():
        layer, wing = layer_of(module)
        for target in targets:
            t_layer, t_wing = layer_of(target)
            if t_layer > layer or (t_layer == layer and wing != t_wing):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_kernels_are_a_leaf(graph):
    outside = {f"{m} -> {t}" for m, ts in graph.items() if m.startswith("ldmole_kernels") for t in ts
               if not t.startswith("ldmole_kernels")}
    assert not outside


def test_no_import_cycles(graph):
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_an_upward_import_inside_a_function(tmp_path):
    """The checker itself: an import hidden in a function body counts."""
    path = tmp_path / "cpu_kernels.py"
    path.write_text("def f():\n    from ldmole_runtime.model.default_base import resolve_base\n")
    modules = {"ldmole_kernels.cpu_kernels": path, "ldmole_runtime.model.default_base": path}
    assert imports_of("ldmole_kernels.cpu_kernels", path, modules) == {"ldmole_runtime.model.default_base"}
