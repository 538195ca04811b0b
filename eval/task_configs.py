"""Where the offline task configs for the LD-MoLE paper's benchmarks live (`--include_path`)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
