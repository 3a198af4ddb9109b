"""What the YOLOV test modules share about the official code's reference files
(``../shared/parity/yolov/README.md``): where they are, how to read them and the fixtures' own
matching rule (``oracle/compare.py``). Test modules import the fixtures ``yolov_dir`` and ``compare``
from here."""
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED

YOLOV_DIR = SHARED / 'parity' / 'yolov'
CLIP = SHARED / 'parity' / 'clips' / 'vid7010_first12'
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


@pytest.fixture(scope='module')
def yolov_dir():
    """The shared YOLOV parity folder; skips when it or the shared clip is absent."""
    if not (YOLOV_DIR / 'make_checkpoint.py').exists() or not CLIP.exists():
        pytest.skip(f'{YOLOV_DIR} or {CLIP} is absent: these tests need the shared parity fixtures')
    return YOLOV_DIR


@pytest.fixture(scope='module')
def compare(yolov_dir):
    """The fixtures' own acceptance rule (``oracle/compare.py``: match, clip_to)."""
    spec = importlib.util.spec_from_file_location('yolov_compare', yolov_dir / 'oracle' / 'compare.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_reference(path: Path) -> dict:
    """A reference file, plain or gzipped JSON."""
    with (gzip.open(path, 'rt') if path.suffix == '.gz' else open(path)) as f:
        return json.load(f)


def frame_files(folder: Path = CLIP):
    """The frame images of a clip folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def as_compare(dets):
    """viddet Detections -> ``compare.match``'s (boxes, scores, labels) per frame."""
    return [(d.boxes.double().numpy(), d.scores.double().numpy(), d.labels.numpy()) for d in dets]


def ref_frames(ref, key='detections'):
    """A reference's ``detections`` (or ``still_detections``) -> (boxes, scores, labels) per frame."""
    return [(np.array([x['bbox'] for x in f[key]], dtype=np.float64).reshape(-1, 4),
             np.array([x['score'] for x in f[key]], dtype=np.float64),
             np.array([x['label'] for x in f[key]], dtype=np.int64)) for f in ref['frames']]


def check_raw_frame0(ref, d0, atol_sums=1e-4, atol_rows=1e-5):
    """The still-image predictions of frame 0 before any selection (``d0`` (A, 35): ``out.decoded[0]``
    of the plain modules) against the reference's ``raw_frame0``: shape, total sum (1e-6
    relative), column sums, the first rows and the 5 highest objectness values."""
    raw = ref['batches'][0]['raw_frame0']
    d0 = d0.double()
    assert list(d0.shape) == raw['shape']
    assert abs(float(d0.sum()) - raw['sum']) <= 1e-6 * abs(raw['sum'])
    np.testing.assert_allclose(d0.sum(0).numpy(), raw['column_sums'], rtol=1e-5, atol=atol_sums)
    np.testing.assert_allclose(d0[:3].numpy(), raw['first_rows'], rtol=1e-5, atol=atol_rows)
    np.testing.assert_allclose(d0[:, 4].sort(descending=True).values[:5].numpy(), raw['obj_sorted_top5'],
                               rtol=1e-5, atol=1e-6)
