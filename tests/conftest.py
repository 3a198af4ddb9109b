"""Shared fixtures: paths to ../shared (real frames, parity fixtures), skipping when absent."""
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for the module: tiny models gain nothing from more, and on a busy 2-core
    machine two spinning OpenMP threads make them ~50x slower. Use with
    ``pytestmark = pytest.mark.usefixtures('one_thread')``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_keys(path: Path) -> dict:
    """A parity key list (``name d0,d1,...`` per line) -> {name: shape}, in file order."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, _, dims = line.strip().partition(' ')
            out[name] = tuple(int(d) for d in dims.split(',') if d)
    return out
