"""What pyproject.toml cannot express: the `kernels/`, `eval/`, `server/` and `cli/` folders install under
project-unique import names, and a `.pth` hook registers `lm_eval --model ldmole` (lm-eval 0.4
discovers no model plugins; see eval/lm_eval_hook.py).

Those four folders hold no `__init__.py`, on purpose. An interpreter started in the repository
root (`python -m`, pytest, torchrun, Ray workers, `docker build`) has the root on `sys.path`, and a
folder with an `__init__.py` there would shadow any installed package of the same name (Hugging
Face's `kernels`, which transformers imports). A folder without one is only a namespace portion,
which Python uses only when no regular package of that name is found anywhere on the path."""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "ldmole_lm_eval.pth"
# installed import name -> folder
FOLDERS = {"ldmole_kernels": "kernels", "ldmole_eval": "eval", "ldmole_server": "server", "ldmole_cli": "cli"}


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
    packages=[*find_packages(include=["ldmole_runtime*"]), *FOLDERS, "ldmole_kernels.triton"],
    package_dir=FOLDERS,
    package_data={
        "ldmole_kernels": ["cpu/*.c", "cpu/*.h"],
        "ldmole_runtime": ["assets/default_adapter/*"],
        "ldmole_eval": ["tasks/*.yaml", "tasks/*.py"],
        "ldmole_server": ["ui/*.html", "ui/*.js", "ui/*.css"],
    },
    cmdclass={"build_py": BuildPyWithHook},
)
