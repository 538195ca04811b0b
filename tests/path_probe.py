"""What an interpreter really imports for the names the repository's folders could shadow.

The probe is source text, run with `exec`, so that it travels anywhere unchanged: into `python -c`,
into a `sitecustomize` that reports when a `python -m` process exits, into a Ray Serve replica.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, sys, sysconfig


def probe():
    import kernels  # Hugging Face's, which transformers imports while it loads a model class
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    specs = {}
    for name in ("kernels", "eval", "server"):
        spec = importlib.util.find_spec(name)
        specs[name] = None if spec is None else spec.origin  # a namespace portion has no origin
    return {"kernels": kernels.__file__, "site_packages": sysconfig.get_paths()["purelib"], "sys_path": sys.path,
            "cwd": __import__("os").getcwd(), "specs": specs,
            "model_params": sum(p.numel() for p in model.parameters())}
"""

# Written as sitecustomize.py into a folder on PYTHONPATH: every `python -m` started with it runs the
# probe just before its module, with the sys.path its command line gave it, and writes the result
# to $LDMOLE_PROBE_DIR/<RANK or pid>.json. (At exit would be later than transformers allows.)
SITECUSTOMIZE = f'''
import json, os, runpy

_PROBE = {PROBE!r}
_run_module_as_main = runpy._run_module_as_main


def _probe_then_run(*args, **kwargs):
    ns = {{}}
    exec(_PROBE, ns)
    report = ns["probe"]()
    name = os.environ.get("RANK", "pid%d" % os.getpid())
    with open(os.path.join(os.environ["LDMOLE_PROBE_DIR"], name + ".json"), "w") as f:
        json.dump(report, f)
    return _run_module_as_main(*args, **kwargs)


runpy._run_module_as_main = _probe_then_run
'''


def run_probe() -> dict:
    ns: dict = {}
    exec(PROBE, ns)
    return ns["probe"]()


def probe_env(folder: Path) -> dict:
    """An environment whose interpreters report through SITECUSTOMIZE into `folder`."""
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in [str(folder), os.environ.get("PYTHONPATH", "")] if p)
    return dict(os.environ, PYTHONPATH=path, LDMOLE_PROBE_DIR=str(folder))


def reports(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def assert_not_shadowed(report: dict, root_on_path: Path = REPO) -> None:
    """`import kernels` found the installed package, the repository's folders are at most namespace
    portions, a transformers model class loaded, and the check meant something: the folder that
    could shadow was on sys.path."""
    assert str(root_on_path) in [os.path.abspath(p or report["cwd"]) for p in report["sys_path"]], report["sys_path"]
    assert report["kernels"].startswith(report["site_packages"]), report["kernels"]
    assert report["kernels"] == report["specs"]["kernels"]
    for name in ("eval", "server"):
        origin = report["specs"][name]
        assert origin is None or not origin.startswith(str(REPO)), (name, origin)
    assert report["model_params"] > 0
