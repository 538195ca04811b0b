import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter; it reads this when kernels are
# decorated, so it is set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# Checkpoints written by the reference LD-MoLE and AdaMoLE code (see their READMEs); they ship in the
# repository so that a clone with nothing beside it runs every test. LDMOLE_FIXTURES points at others.
FIXTURES = Path(os.environ.get("LDMOLE_FIXTURES", REPO / "tests" / "fixtures" / "official-ldmole"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LDMOLE_SLOW_TESTS") == "1":
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:  # deselected, not skipped: `make test-slow` (LDMOLE_SLOW_TESTS=1) runs them
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


# A skipped test passes in silence; here it fails the run instead, so that a missing fixture,
# compiler or package cannot turn a red suite green. LDMOLE_ALLOW_SKIPS=1 relaxes it (a GPU test on
# a machine without one, say).
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and exitstatus == pytest.ExitCode.OK and os.environ.get("LDMOLE_ALLOW_SKIPS") != "1":
        print(f"\n{len(_skipped)} test(s) skipped, which fails the run (LDMOLE_ALLOW_SKIPS=1 allows it):")
        print("\n".join(f"  {nodeid}" for nodeid in _skipped))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    assert FIXTURES.is_dir(), f"reference-code fixtures not found at {FIXTURES}"
    return FIXTURES
