"""Shared fixtures: paths to ../shared (real frames, parity fixtures), skipping when absent."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'


def shared_path(*parts) -> Path:
    """Path under ../shared, or skip the test with the reason when it is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f'{p} is absent: this test needs the shared data folder beside the repository')
    return p


@pytest.fixture
def shared():
    return shared_path
