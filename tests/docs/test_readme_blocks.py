"""The README is a front door that works: its shell blocks marked ```` ```bash runnable ```` (and
any so marked in docs/*.md) run as written, each in its own bash with `set -euo pipefail`, in a
fresh copy of the repository; it stays short; and every relative link in it and in docs/ resolves.

The copy is what a clone gets: the files git tracks plus the untracked ones it does not ignore
(`git ls-files --cached --others --exclude-standard`), so the test also works before a commit.
The virtual environment is not rebuilt: `<copy>/.venv` is a symlink to this repository's `.venv`.
Its editable install maps the import names to this checkout's folders, so PYTHONPATH points them at
the copy's folders instead (a folder of symlinks named as setup.py installs them): the copy's code
is what runs. LDMOLE_CACHE stays the user's cache, so the SmolLM2 conversion and the C kernel
build are reused. A block that starts a server runs in its own process group, which is killed
afterwards, and gets a free port through $PORT (the README's blocks default to 8100).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200
BLOCK_TIMEOUT_S = 300  # each block; together they take about a minute on 2 cores

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    info: str
    body: str

    @property
    def runnable(self) -> bool:
        words = self.info.split()
        return bool(words) and words[0] == "bash" and "runnable" in words[1:]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of a Markdown page (indented ones too, e.g. inside a list item)."""
    blocks, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, start = len(m["indent"]), m["fence"], i
        body = []
        i += 1
        while i < len(lines) and not closes(lines[i], fence):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append(Block(page, start + 1, m["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def closes(line: str, fence: str) -> bool:
    """A closing fence: only fence characters, at least as many as the opening one."""
    line = line.strip()
    return line.startswith(fence) and not line.strip(fence[0])


def outside_blocks(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    out, fence = [], None
    for line in page.read_text().splitlines():
        if fence is None:
            m = FENCE.match(line)
            if m is None:
                out.append(line)
            else:
                fence = m["fence"]
        elif closes(line, fence):
            fence = None
    return out


def prose(page: Path) -> list[str]:
    """Lines outside code blocks, inline code removed (a link inside code is not a link)."""
    return [re.sub(r"`[^`]*`", "", line) for line in outside_blocks(page)]


def headings(page: Path) -> list[str]:
    return [m[1] for line in outside_blocks(page) if (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line))]


RUNNABLE = [b for page in PAGES for b in fenced_blocks(page) if b.runnable]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_names() -> dict[str, str]:
    """Installed import name -> folder of the repository, as setup.py declares them."""
    tree = ast.parse((REPO / "setup.py").read_text())
    folders = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                   if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FOLDERS" for t in node.targets))
    return {"ldmole_runtime": "ldmole_runtime", **folders}


@pytest.fixture(scope="session")
def fresh_copy(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the repository as a clone would hold it, and the environment its blocks run in."""
    assert (REPO / ".venv" / "bin" / "ldmole").exists(), "build the virtual environment first: make install"
    root = tmp_path_factory.mktemp("readme") / "ldmole"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if not src.exists() and not src.is_symlink():  # deleted in the work tree, not yet in git
            continue
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    (root / ".venv").symlink_to(REPO / ".venv")
    names = root.parent / "import-names"
    names.mkdir()
    for name, folder in import_names().items():
        (names / name).symlink_to(root / folder)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRITON_"))}
    env["PYTHONPATH"] = str(names)
    env["LDMOLE_CACHE"] = os.environ.get("LDMOLE_CACHE") or str(Path.home() / ".cache" / "ldmole")
    probe = subprocess.run(
        [str(root / ".venv" / "bin" / "python"), "-c",
         "import importlib.util as u\n"
         f"for n in {sorted(import_names())!r}:\n"
         "    s = u.find_spec(n)\n"
         "    print(n, s.origin or list(s.submodule_search_locations)[0])"],
        cwd=root, env=env, capture_output=True, text=True, check=True)
    found = dict(line.split(" ", 1) for line in probe.stdout.splitlines())
    assert sorted(found) == sorted(import_names()), probe.stdout
    for name, where in found.items():
        assert Path(where).resolve().is_relative_to(root), f"{name} would be imported from {where}, not the copy"
    return root, env


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runnable_block(block: Block, fresh_copy, tmp_path):
    root, env = fresh_copy
    env = {**env, "PORT": str(free_port())}
    log = tmp_path / "output.txt"
    started = time.monotonic()
    with log.open("wb") as out:
        # its own session: a server the block started in the background is killed with it
        proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + block.body], cwd=root, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    took = time.monotonic() - started
    output = log.read_text(errors="replace")
    print(f"{block.where}: {took:.1f} s")
    detail = f"\n--- block ({block.where}) ---\n{block.body}--- output (last 8000 characters) ---\n{output[-8000:]}"
    assert rc is not None, f"{block.where} ran past {BLOCK_TIMEOUT_S} s{detail}"
    assert rc == 0, f"{block.where} exited with {rc}{detail}"


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the rest belongs in docs/"


# Each way of using ldmole has a runnable example in the README: (name, what one block must contain).
WAYS = {
    "HTTP": [r"ldmole serve\b", r"curl .*/v1/"],
    "scoring": [r"/v1/score|ldmole generate .*--choices"],
    "lm_eval": [r"lm_eval --model ldmole\b"],
    "train then serve": [r"ldmole train\b", r"ldmole serve --adapter [\w-]+=runs/"],
}


@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_of_using_it_has_a_runnable_readme_block(way):
    readme_blocks = [b.body for b in RUNNABLE if b.page == README]
    assert any(all(re.search(p, body, re.S) for p in WAYS[way]) for body in readme_blocks), \
        f"README.md has no ```bash runnable``` block for {way} (one block matching {WAYS[way]})"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(page):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall("\n".join(prose(page))):  # a link's text may wrap over lines
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(REPO) or not dest.exists():
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with that anchor in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: " + "; ".join(broken)
