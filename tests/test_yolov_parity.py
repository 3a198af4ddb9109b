"""YOLOV / YOLOV++ against the official code's own outputs, on every reference file there is.

A reference file is what the official code computed over one clip with a checkpoint of
``make_checkpoint.py keys/<model>.txt --seed N`` (layout: ``../shared/parity/yolov/README.md``). The
files are found, not named: every ``ref_*.json`` (or ``.json.gz``) in ``../shared/parity/yolov/`` (clips in
``../shared/parity/clips/<clip>``) and in ``tests/fixtures/yolov/`` (clips named ``<snippet>_first<N>``:
the first N frames of that mini_vid snippet; how they were made: the README there). The model, the
clip and the seed are read off each file, so the same checks run on references made on other clips
and seeds.

Checked in the order the fixtures' README advises: the uint8 input of every frame (MD5), the
still-image predictions of frame 0 before any selection, the candidates each frame selects, the
still-image detections, and the final video detections of the whole clip (one batch, every frame
attending to all) through the engine, by the fixtures' own matching rule (``oracle/compare.py``,
with and without ``--clip``). The per-frame quantities do not depend on the other frames of a batch,
so they are checked on the first 3 frames. S models run in the ordinary suite, L and X ones are slow,
and the L references in ``tests/fixtures/yolov/`` are ``extended`` (``VIDDET_EXTENDED=1``).
"""
import copy
import hashlib
import re

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, SHARED
from viddet import speedups
from viddet.checkpoints.loading import load_model
from viddet.data.image_sources import ImageListSource
from viddet.engine.video import run_video
from viddet.methods.yolov import YOLOV, YOLOVPP, clip_detections
from viddet.models.yolox import letterbox
from viddet.structures import Detections
from yolov_refs import YOLOV_DIR, as_compare, check_raw_frame0, compare, read_reference, ref_frames, yolov_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures('one_thread')

OWN_DIR = REPO / 'tests' / 'fixtures' / 'yolov'
METHODS = {'yolov': YOLOV, 'yolovpp': YOLOVPP}
PER_FRAME = 3
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


def reference_files(model_runs: bool = True):
    """Every reference file, as pytest params; where the test runs the model (``model_runs``), L and
    X models are marked slow, and those of ``tests/fixtures/yolov/`` also extended."""
    files = [f for d in (YOLOV_DIR, OWN_DIR) for pattern in ('ref_*.json', 'ref_*.json.gz') for f in sorted(d.glob(pattern))]
    params = []
    for f in files:
        model = read_reference(f)['model']
        marks = [pytest.mark.slow] if model_runs and not model.endswith('_s') else []
        if marks and f.parent == OWN_DIR:   # the shared L references stay in the default run
            marks.append(pytest.mark.extended)
        params.append(pytest.param(f, id=('own-' if f.parent == OWN_DIR else 'shared-') + f.stem, marks=marks))
    return params or [pytest.param(None, marks=pytest.mark.skip(reason=f'no ref_*.json in {YOLOV_DIR} or {OWN_DIR}'))]


def clip_frames(clip: str):
    """The frame files of a reference's clip: ``../shared/parity/clips/<clip>``, else
    ``<snippet>_first<N>``: the first N frames (sorted) of that mini_vid snippet."""
    folder = SHARED / 'parity' / 'clips' / clip
    m = re.fullmatch(r'(.+)_first(\d+)', clip)
    if not folder.is_dir() and m:
        found = sorted((SHARED / 'data' / 'mini_vid' / 'Data' / 'VID').glob(f'*/{m.group(1)}'))
        folder = found[0] if found else folder
    if not folder.is_dir():
        pytest.skip(f'the frames of clip {clip} are absent (looked in {SHARED}/parity/clips and mini_vid)')
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:int(m.group(2))] if m and folder.parent.parent.name == 'VID' else files


@pytest.fixture(scope='module')
def case(parity_checkpoint):
    """``get(path)``: (reference, its frame files, the model loaded from the regenerated checkpoint)."""
    def get(path):
        ref = read_reference(path)
        seed = int(re.search(r'_seed(\d+)\.pth$', ref['checkpoint']).group(1))
        loaded = load_model(str(parity_checkpoint(f'{ref["model"]}.txt', seed, YOLOV_DIR)))
        assert type(loaded.model) is METHODS[ref['model'].split('_')[0]]
        files = clip_frames(ref['clip'])
        assert [p.name for p in files] == [f['file_name'] for f in ref['frames']]
        return ref, files, loaded.model
    return get


@pytest.mark.parametrize('path', reference_files(model_runs=False))
def test_preprocessing_is_bit_exact_on_every_frame(path):
    ref = read_reference(path)
    for file, expected in zip(clip_frames(ref['clip']), ref['frames']):
        tensor, meta = letterbox(cv2.imread(str(file)))
        assert tensor.shape == (3, 576, 576) and tensor.dtype == torch.float32
        assert hashlib.md5(tensor.numpy().astype(np.uint8).tobytes()).hexdigest() == expected['input']['md5_uint8_chw']
        assert float(tensor.double().sum()) == expected['input']['sum']
        h, w = expected['image_size']
        r = min(576 / h, 576 / w)
        assert meta.ori_shape == (h, w) and meta.img_shape == (int(h * r), int(w * r))
        assert float(meta.scale_factor[0]) == np.float32(expected['ratio'])


@pytest.mark.parametrize('path', reference_files())
def test_per_frame_parity_with_the_official_code(path, case, compare):
    """Raw frame-0 predictions, selected candidates and still detections of the first frames, from
    the plain modules (the reference implementation: every value to float rounding); the fast ones
    that every command runs (their Winograd convolutions round differently, and YOLOV's fast head
    computes class scores at the top-750 anchors only) give >= 99% of the still detections."""
    ref, files, fast = case(path)
    plain = speedups.revert(copy.deepcopy(fast))
    imgs = torch.stack([letterbox(cv2.imread(str(p)))[0] for p in files[:PER_FRAME]])
    frames = ref['frames'][:PER_FRAME]
    expected = ref_frames(ref, 'still_detections')[:PER_FRAME]
    for model in (plain, fast):
        with torch.no_grad():
            out = model(imgs)
        still = [Detections(r[:, :4] / f['ratio'], r[:, 4] * r[:, 5], r[:, 6].long()) for r, f in zip(out.still, frames)]
        matched, total, _ = compare.match(expected, as_compare(still))
        assert total >= 10 * len(frames) and matched >= 0.99 * total, f'still: {matched}/{total}'
        if model is plain:
            check_raw_frame0(ref, out.decoded[0])
            for sel, f in zip(out.selected, frames):
                assert sel.tolist() == f['selected_anchor_idx'], f['file_name']
            assert matched == total, f'still (plain modules): {matched}/{total}'


@pytest.mark.parametrize('path', reference_files())
def test_clip_parity_with_the_official_code(path, case, compare):
    """The whole clip through the engine (offline: one batch) with raw boxes, matched as the
    fixtures are (unclipped), then clipped as the official converter does (``compare.py --clip``)."""
    ref, files, model = case(path)
    assert model.clip, 'boxes are clipped by default'
    model.clip = False
    source = ImageListSource(files)
    try:
        dets = [r.detections for r in run_video(model, source, mode='offline')]
    finally:
        source.close()
        model.clip = True
    assert len(dets) == len(ref['frames'])
    sizes = [f['image_size'] for f in ref['frames']]
    expected = ref_frames(ref)
    matched, total, per_frame = compare.match(expected, as_compare(dets))
    assert [o for _, _, o in per_frame] == [len(e[0]) for e in expected], 'detection counts differ'
    assert total >= 20 * len(files) and matched >= 0.99 * total, f'{matched}/{total} reference detections reproduced'
    clipped = [clip_detections(d, h, w) for d, (h, w) in zip(dets, sizes)]
    for d, (h, w) in zip(clipped, sizes):
        assert float(d.boxes[:, 0::2].max()) <= w and float(d.boxes[:, 1::2].max()) <= h
        assert float(d.boxes.min()) >= 0
    c_matched, c_total, _ = compare.match(compare.clip_to(expected, sizes), as_compare(clipped))
    assert c_total >= len(files) and c_matched >= 0.99 * c_total, f'clipped: {c_matched}/{c_total} reproduced'
