import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter; it reads this when kernels are
# decorated, so it is set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("LDMOLE_FIXTURES", REPO.parent / "shared" / "fixtures" / "official-ldmole"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LDMOLE_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="real-model test; run `make test-slow` (LDMOLE_SLOW_TESTS=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference-code fixtures not found at {FIXTURES} (they live in ../shared beside the checkout)")
    return FIXTURES
