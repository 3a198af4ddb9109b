"""Shared fixtures: paths to ../shared (real frames, parity fixtures), skipping when absent; torch's
global state restored around every test; a local HTTP server and a $VIDDET_HOME for download tests."""
import http.server
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'

# the most the suite holds on disk at once (measured: 2.8 GB; the parity checkpoints and one training test)
DISK_NEEDED_GB = 4


def _disk_line(config) -> tuple:
    where = Path(config._tmp_path_factory.getbasetemp()).parent
    free = shutil.disk_usage(where).free / 2 ** 30
    return free, f'{free:.1f} GiB free under {where} (the suite needs about {DISK_NEEDED_GB} GiB)'


def pytest_report_header(config):
    """States the free space where the tests write (shown without ``-q``)."""
    return 'viddet: ' + _disk_line(config)[1]


def pytest_sessionstart(session):
    """On a disk too full for the suite, a warning in the summary (also under ``-q``) says why tests
    fail with "No space left on device"."""
    free, line = _disk_line(session.config)
    if free < DISK_NEEDED_GB:
        session.config.issue_config_time_warning(pytest.PytestWarning('viddet: only ' + line), stacklevel=2)


EXTENDED = os.environ.get('VIDDET_EXTENDED') == '1'


def pytest_collection_modifyitems(config, items):
    """Tests marked ``extended`` (more parity cases of the same code: the big transformer backbones,
    the independent L-size references) run only with ``VIDDET_EXTENDED=1``, to keep the default run
    inside CI's time; they are skipped, with that reason, otherwise."""
    if EXTENDED:
        return
    skip = pytest.mark.skip(reason='an extended parity case: run with VIDDET_EXTENDED=1')
    for item in items:
        if 'extended' in item.keywords:
            item.add_marker(skip)


# torch's thread count when the session starts (conftest is imported before any test module)
DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def isolated_torch_state():
    """Every test starts from torch's default thread count, grad mode and dtype, and whatever a test
    (or a function it calls, e.g. ``train(threads=1)``) changes is undone afterwards, so no result
    depends on which tests ran before (float summation order depends on the thread count)."""
    torch.set_num_threads(DEFAULT_THREADS)
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    yield
    torch.set_num_threads(DEFAULT_THREADS)
    torch.set_grad_enabled(grad)
    torch.set_default_dtype(dtype)


def shared_path(*parts) -> Path:
    """Path under ../shared, or skip the test with the reason when it is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f'{p} is absent: this test needs the shared data folder beside the repository')
    return p


@pytest.fixture
def shared():
    return shared_path


@pytest.fixture(scope='session')
def parity_checkpoint(tmp_path_factory):
    """``get(keys, seed=0, parity_dir=None)``: the path of the MMTracking-format checkpoint that
    ``../shared/parity/make_checkpoint.py keys/<keys> --seed <seed>`` writes (R-50: 280-410 MB each).

    Each one is made once per session and shared by every module that needs it (the inference parity,
    training parity and demo tests), so that the suite's disk use stays at one copy per checkpoint;
    all are deleted when the session ends. Skips the test when the parity folder is absent.
    """
    out = tmp_path_factory.mktemp('parity_ckpt')
    made = {}

    def get(keys: str, seed: int = 0, parity_dir: Path = None) -> Path:
        parity = Path(parity_dir) if parity_dir else SHARED / 'parity'
        if not (parity / 'make_checkpoint.py').exists():
            pytest.skip(f'{parity / "make_checkpoint.py"} is absent: this test needs the shared parity fixtures '
                        'beside the repository')
        key = (str(parity), keys, seed)
        if key not in made:
            path = out / f'{Path(keys).stem}_seed{seed}_{len(made)}.pth'
            subprocess.run([sys.executable, str(parity / 'make_checkpoint.py'), str(parity / 'keys' / keys),
                            str(path), '--seed', str(seed)], check=True)
            made[key] = path
        return made[key]

    yield get
    for path in made.values():
        path.unlink(missing_ok=True)


@pytest.fixture
def one_thread(isolated_torch_state):
    """One intra-op thread for the test (undone by :func:`isolated_torch_state`): tiny models gain
    nothing from more, and on a busy 2-core machine two spinning OpenMP threads make them ~50x
    slower. Use with ``pytestmark = pytest.mark.usefixtures('one_thread')``."""
    torch.set_num_threads(1)
    yield


def read_keys(path: Path) -> dict:
    """A parity key list (``name d0,d1,...`` per line) -> {name: shape}, in file order."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, _, dims = line.strip().partition(' ')
            out[name] = tuple(int(d) for d in dims.split(',') if d)
    return out


# ------------------------------------------------------------------------------------ local server
class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www; ``.hits`` lists requested paths."""
    root = tmp_path / 'www'
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), partial(_Handler, directory=str(root)))
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.root = root
    httpd.base = f'http://127.0.0.1:{httpd.server_address[1]}/'
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / 'home'
    monkeypatch.setenv('VIDDET_HOME', str(h))
    return h
