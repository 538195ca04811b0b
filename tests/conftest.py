import os
from pathlib import Path

import pytest

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
