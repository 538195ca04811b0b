"""What pyproject.toml cannot express: the `eval/` folder installs under the import name
`ldmole_eval` (a bare `eval` package would shadow other projects' eval modules), and a `.pth` hook
registers `lm_eval --model ldmole` (lm-eval 0.4 discovers no model plugins; see eval/lm_eval_hook.py)."""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "ldmole_lm_eval.pth"


class BuildPyWithHook(build_py):
    """Puts the .pth at the root of what becomes site-packages: the build folder of a wheel, or for
    an editable install the unpacked editable wheel (which takes no files from the build folder)."""

    def run(self):
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(os.path.join("eval", PTH), os.path.join(root, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(
    # eval/ and kernels/ install under project-unique names: a top-level `eval` or `kernels` would
    # shadow other distributions (Hugging Face's `kernels`, which transformers probes for)
    packages=[*find_packages(include=["ldmole_runtime*", "server*"]), "ldmole_eval", "ldmole_kernels",
              "ldmole_kernels.triton"],
    package_dir={"ldmole_eval": "eval", "ldmole_kernels": "kernels"},
    package_data={
        "ldmole_kernels": ["cpu/*.c"],
        "ldmole_runtime": ["assets/default_adapter/*"],
        "ldmole_eval": ["tasks/*.yaml", "tasks/*.py"],
    },
    cmdclass={"build_py": BuildPyWithHook},
)
