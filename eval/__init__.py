"""ldmole in lm-evaluation-harness: the `ldmole` model (`lm_eval --model ldmole`) and offline task
configs for the LD-MoLE paper's benchmarks. Installed under the import name `ldmole_eval`.

Kept free of heavy imports: the `.pth` hook imports this package in every interpreter start-up.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
