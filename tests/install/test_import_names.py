"""The installed distribution claims only project-unique top-level import names: a top-level
`kernels`, `eval`, `server` or `cli` would shadow other packages (Hugging Face's `kernels`, which
transformers imports)."""

import importlib
import importlib.metadata as md


def test_top_level_names_are_project_unique():
    claimed = {name for name, dists in md.packages_distributions().items() if "ldmole" in dists}
    assert {"ldmole_runtime", "ldmole_kernels", "ldmole_eval", "ldmole_server", "ldmole_cli"} <= claimed
    assert not claimed & {"kernels", "eval", "server", "cli"}, sorted(claimed)
    kernels = importlib.import_module("ldmole_kernels.cpu_kernels")
    assert all(f.is_file() for f in kernels.SOURCES + kernels.HEADERS)  # the C sources ship too
