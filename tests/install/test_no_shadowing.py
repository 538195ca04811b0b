"""No folder of the repository shadows an installed package, for interpreters started in its root.

`python -c`, `python -m` and torchrun workers put the working directory first on sys.path (Ray
Serve replicas: see test_cluster.py; docker build: test_dockerfile.py). The repository has
`kernels/`, `eval/` and `server/` folders; Hugging Face's `kernels`, which transformers imports
while it loads a model class, must still be the one imported.
"""

import importlib.metadata
import json
import subprocess
import sys

from live_server import free_port
from path_probe import PROBE, REPO, assert_not_shadowed, probe_env, reports


def test_hf_kernels_is_installed():
    """The premise of every test here: the package that could be shadowed is really there."""
    assert importlib.metadata.version("kernels")
    assert (REPO / "kernels").is_dir() and not (REPO / "kernels" / "__init__.py").exists()


def test_python_c_in_the_root():
    code = PROBE + "\nimport json; print(json.dumps(probe()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_not_shadowed(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_python_m_cli_in_the_root(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldmole_cli.main", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=probe_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "serve" in proc.stdout
    [report] = reports(tmp_path)
    assert_not_shadowed(report)


def test_torchrun_workers_in_the_root(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ldmole_cli.main", "--help"]
    env = dict(probe_env(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("[0-9].json"))]
    assert len(workers) == 2 and len(reports(tmp_path)) == 3  # two workers and the launcher
    for report in reports(tmp_path):
        assert_not_shadowed(report)
