"""The Dockerfile installs what the lock pins and runs no Python where a folder could shadow a package.

No Docker engine runs on these machines, so its RUN steps are read, not run: each `pip install`
takes `--no-deps` and names only the lock, a pin read from the lock, or the project's own folder
(nothing left for pip to resolve); each `python` step's probe runs here, in a copy of the folder
the image would run it in (its WORKDIR, with what the COPY steps put there).
"""

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from path_probe import PROBE, REPO, assert_not_shadowed

LOCK = "requirements.lock"


def instructions():
    """(keyword, argument) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arg = line.partition(" ")
            yield keyword.upper(), arg.strip()


def commands(run_arg):
    """The simple commands of a shell line, each as its words."""
    lexer = shlex.shlex(run_arg, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


def pip_installs():
    return [c for kw, arg in instructions() if kw == "RUN" for c in commands(arg)
            if c[:2] == ["pip", "install"] or c[1:4] == ["-m", "pip", "install"]]


def test_every_pip_install_uses_the_lock():
    installs = pip_installs()
    assert any(["-r", LOCK] == c[i:i + 2] for c in installs for i in range(len(c)))
    pinned = {line.split(";")[0].strip() for line in (REPO / LOCK).read_text().splitlines() if "==" in line}
    for cmd in installs:
        assert "--no-deps" in cmd, cmd
        args = iter(cmd[cmd.index("install") + 1:])
        for arg in args:
            if arg in ("-r", "--extra-index-url", "--index-url"):
                value = next(args)
                assert arg != "-r" or value == LOCK, cmd
            elif arg.startswith("-"):
                continue
            elif arg.startswith("$(grep"):  # a pin read out of the lock, e.g. pip's own
                assert LOCK in arg, cmd
            else:
                assert arg == "." or arg in pinned, f"{arg!r} is neither the project nor a pin of the lock: {cmd}"


def test_the_lock_pins_every_line_exactly():
    for line in (REPO / LOCK).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+( ; .+)?", line.strip()), line


def test_python_steps_run_where_kernels_resolves_to_site_packages(tmp_path):
    image = tmp_path / "image"
    workdir = Path("/")
    steps = 0
    for kw, arg in instructions():
        if kw == "WORKDIR":
            workdir = workdir / arg
            (image / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)
        elif kw == "COPY":
            *sources, dest = shlex.split(arg)
            target = image / (workdir / dest).relative_to("/")
            for src in sources:
                into = target / Path(src).name if dest.endswith("/") else target
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, into, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / src, into)
        elif kw == "RUN" and any(c[0].startswith("python") for c in commands(arg)):
            steps += 1
            cwd = image / workdir.relative_to("/")
            code = PROBE + "\nimport json; print(json.dumps(probe()))"
            proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert_not_shadowed(json.loads(proc.stdout.strip().splitlines()[-1]), root_on_path=cwd)
    assert steps >= 1  # the default base is converted at build time


def test_the_image_holds_every_installed_package_folder():
    """setup.py installs these folders; an image without one has an `ldmole` that cannot import."""
    tree = ast.parse((REPO / "setup.py").read_text())
    mapping = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "FOLDERS")
    folders = {"ldmole_runtime", *mapping.values()}
    copied = {arg.split()[0] for keyword, arg in instructions() if keyword == "COPY"}
    assert folders <= copied, sorted(folders - copied)
