"""YOLOV / YOLOV++ against the official code's own outputs (../shared/parity/yolov/README.md).

The checkpoints are regenerated with the fixtures' ``make_checkpoint.py keys/<model>.txt --seed 0``
and loaded the way every command loads a checkpoint (``load_model``: the method and the YOLOX
variant are read off the file). Checked in the order the fixtures' README advises: the uint8 input
of every frame (MD5), the still-image predictions of frame 0 before any selection, the candidates
each frame selects, the still-image detections, and the final video detections of the whole 12-frame
clip (one batch, every frame attending to all) through the engine, by the fixtures' own matching
rule (``oracle/compare.py``, with and without ``--clip``).

The per-frame quantities (input, raw predictions, candidates, still detections) do not depend on
the other frames of a batch, so they are checked on the first 3 frames; the final detections need
the whole clip. S models run in the ordinary suite (about 20 s each on one thread), L ones are slow.
"""
import hashlib
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from viddet.checkpoints.loading import load_model
from viddet.data.image_sources import ArraySource, FolderSource
from viddet.engine.video import run_video
from viddet.errors import VidDetError
from viddet.methods import method_of_keys
from viddet.methods.yolov import YOLOV, YOLOVPP, clip_detections, variant_of_state, video_batches
from viddet.models.yolox import letterbox
from viddet.structures import Detections

pytestmark = pytest.mark.usefixtures('one_thread')

YOLOV_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'parity' / 'yolov'
CLIP = YOLOV_DIR.parent / 'clips' / 'vid7010_first12'
MODELS = {'yolov_s': YOLOV, 'yolovpp_s': YOLOVPP, 'yolov_l': YOLOV, 'yolovpp_l': YOLOVPP}
FAST = ['yolov_s', 'yolovpp_s']
SLOW = [pytest.param('yolov_l', marks=pytest.mark.slow), pytest.param('yolovpp_l', marks=pytest.mark.slow)]
PER_FRAME = 3


@pytest.fixture(scope='module')
def yolov_dir():
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


@pytest.fixture(scope='module')
def case(yolov_dir, parity_checkpoint):
    """``get(model)``: (reference JSON, loaded model)."""
    def get(name):
        ref = json.loads((yolov_dir / f'ref_{name}_vid7010_first12_seed0.json').read_text())
        loaded = load_model(str(parity_checkpoint(f'{name}.txt', 0, yolov_dir)))
        assert type(loaded.model) is MODELS[name]
        return ref, loaded.model
    return get


def frame_files():
    return sorted(p for p in CLIP.iterdir() if p.suffix.lower() in ('.jpeg', '.jpg', '.png'))


def as_compare(dets):
    return [(d.boxes.double().numpy(), d.scores.double().numpy(), d.labels.numpy()) for d in dets]


def ref_frames(ref, key='detections'):
    return [(np.array([x['bbox'] for x in f[key]], dtype=np.float64).reshape(-1, 4),
             np.array([x['score'] for x in f[key]], dtype=np.float64),
             np.array([x['label'] for x in f[key]], dtype=np.int64)) for f in ref['frames']]


# ------------------------------------------------------------------------------------ units
def test_preprocessing_is_bit_exact_on_every_frame(yolov_dir):
    ref = json.loads((yolov_dir / 'ref_yolov_s_vid7010_first12_seed0.json').read_text())
    for path, expected in zip(frame_files(), ref['frames']):
        assert path.name == expected['file_name']
        tensor, meta = letterbox(cv2.imread(str(path)))
        assert tensor.shape == (3, 576, 576) and tensor.dtype == torch.float32
        assert hashlib.md5(tensor.numpy().astype(np.uint8).tobytes()).hexdigest() == expected['input']['md5_uint8_chw']
        assert float(tensor.double().sum()) == expected['input']['sum']
        assert meta.ori_shape == tuple(expected['image_size']) and meta.img_shape == (324, 576)
        assert float(meta.scale_factor[0]) == np.float32(expected['ratio'])


def test_variant_and_method_are_read_off_the_keys(yolov_dir):
    from conftest import read_keys
    expect = {'yolov_s': ('yolov', 'yolox_s'), 'yolov_l': ('yolov', 'yolox_l'), 'yolov_x': ('yolov', 'yolox_x'),
              'yolovpp_s': ('yolovpp', 'yolox_s'), 'yolovpp_l': ('yolovpp', 'yolox_l')}
    for name, (method, variant) in expect.items():
        keys = read_keys(yolov_dir / 'keys' / f'{name}.txt')
        state = {k: torch.zeros(s) for k, s in keys.items()}
        assert method_of_keys(keys).name == method
        assert variant_of_state(state) == variant
        model = method_of_keys(keys).build(variant)
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert own == keys, f'{name}: the state dict differs from the official one'


def test_build_refuses_a_faster_rcnn_backbone():
    with pytest.raises(VidDetError, match='YOLOX backbone'):
        YOLOV.build('r50')


@pytest.mark.parametrize('method', ['yolov', 'yolovpp'])
def test_training_is_refused_clearly(method):
    from viddet.config.training import config_from_dict
    with pytest.raises(VidDetError, match='my.yaml: model.method: YOLOV.* cannot be trained in viddet yet'):
        config_from_dict({}, 'my.yaml', [f'model.method={method}'])
    with pytest.raises(NotImplementedError, match='not implemented'):
        YOLOV.build('yolox_s').losses(None, None)


def test_video_batches_one_batch_below_gframe_else_seeded_permutation():
    assert video_batches(12, 32, 0) == [list(range(12))]
    batches = video_batches(70, 32, 5)
    assert [len(b) for b in batches] == [32, 32, 6]
    assert sorted(sum(batches, [])) == list(range(70))
    assert batches == video_batches(70, 32, 5) and batches != video_batches(70, 32, 6)
    assert sorted(video_batches(32, 32, 0)[0]) == list(range(32))   # 32 frames: shuffled, as the official


def test_clip_detections_as_the_official_converter():
    det = Detections(torch.tensor([[-5., 10, 50, 20], [1270, 700, 1300, 730], [-9, 0, -1, 5]]),
                     torch.tensor([0.9, 0.5, 0.4]), torch.tensor([1, 2, 3]))
    out = clip_detections(det, 720, 1280)
    assert out.boxes.tolist() == [[0, 10, 50, 20], [1270, 700, 1280, 720]]
    assert out.labels.tolist() == [1, 2]


# ------------------------------------------------------------------------------------ parity
def check_per_frame(ref, model, compare):
    """Raw frame-0 predictions, selected candidates and still detections of the first frames."""
    imgs = torch.stack([letterbox(cv2.imread(str(p)))[0] for p in frame_files()[:PER_FRAME]])
    with torch.no_grad():
        out = model(imgs)
    raw = ref['batches'][0]['raw_frame0']
    d0 = out.decoded[0].double()
    assert list(d0.shape) == raw['shape']
    assert abs(float(d0.sum()) - raw['sum']) <= 1e-6 * abs(raw['sum'])
    np.testing.assert_allclose(d0.sum(0).numpy(), raw['column_sums'], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(d0[:3].numpy(), raw['first_rows'], rtol=1e-5, atol=1e-5)
    frames = ref['frames'][:PER_FRAME]
    for sel, f in zip(out.selected, frames):
        assert sel.tolist() == f['selected_anchor_idx'], f['file_name']
    ratio = frames[0]['ratio']
    still = [Detections(r[:, :4] / ratio, r[:, 4] * r[:, 5], r[:, 6].long()) for r in out.still]
    matched, total, _ = compare.match(ref_frames(ref, 'still_detections')[:PER_FRAME], as_compare(still))
    assert total >= 20 * PER_FRAME and matched == total, f'still: {matched}/{total}'


def run_clip(model, compare, ref):
    """The whole clip through the engine (offline: one batch) with raw boxes, matched as the
    fixtures are (unclipped), then clipped as the official converter does (``compare.py --clip``).
    Returns ((matched, total) raw, (matched, total) clipped)."""
    model.clip = False
    source = FolderSource(str(CLIP))
    try:
        dets = [r.detections for r in run_video(model, source, mode='offline')]
    finally:
        source.close()
        model.clip = True
    assert len(dets) == 12
    sizes = [f['image_size'] for f in ref['frames']]
    expected = ref_frames(ref)
    matched, total, per_frame = compare.match(expected, as_compare(dets))
    assert [o for _, _, o in per_frame] == [len(e[0]) for e in expected], 'detection counts differ'
    clipped = [clip_detections(d, h, w) for d, (h, w) in zip(dets, sizes)]
    for d, (h, w) in zip(clipped, sizes):
        assert float(d.boxes[:, 0::2].max()) <= w and float(d.boxes[:, 1::2].max()) <= h
        assert float(d.boxes.min()) >= 0
    c_matched, c_total, _ = compare.match(compare.clip_to(expected, sizes), as_compare(clipped))
    return (matched, total), (c_matched, c_total)


@pytest.mark.parametrize('name', FAST + SLOW)
def test_per_frame_parity_with_the_official_code(name, case, compare):
    ref, model = case(name)
    check_per_frame(ref, model, compare)


@pytest.mark.parametrize('name', FAST + SLOW)
def test_clip_parity_with_the_official_code(name, case, compare):
    ref, model = case(name)
    assert model.clip, 'boxes are clipped by default'
    (matched, total), (c_matched, c_total) = run_clip(model, compare, ref)
    assert total >= 1000 and c_total >= 100   # most boxes of these random weights lie in the grey padding
    assert matched >= 0.99 * total, f'{name}: {matched}/{total} reference detections reproduced'
    assert c_matched >= 0.99 * c_total, f'{name}, clipped: {c_matched}/{c_total} reference detections reproduced'


def test_long_video_batches_are_seeded_and_small_batches_give_still_detections(case, compare):
    """5 frames with gframe=3: a seeded permutation cut into batches of 3 and 2 frames, each at most
    4 frames, so each frame gets the still-image detections of its candidates (``val_to_imdb.py``),
    which do not depend on the batch: the fixtures' ``still_detections``, whatever the order."""
    ref, model = case('yolov_s')
    assert video_batches(5, 3, 0) == [[2, 4, 3], [0, 1]]   # each batch computed when its first frame is reached
    images = [cv2.imread(str(p)) for p in frame_files()[:5]]
    model.gframe, model.clip = 3, False
    try:
        dets = [r.detections for r in run_video(model, ArraySource(images), mode='offline')]
    finally:
        model.gframe, model.clip = 32, True
    expected = ref_frames(ref, 'still_detections')[:5]
    matched, total, per_frame = compare.match(expected, as_compare(dets))
    assert total >= 100 and matched == total and [o for _, _, o in per_frame] == [len(e[0]) for e in expected]


def test_online_mode_is_refused_clearly(case):
    _, model = case('yolov_s')
    source = FolderSource(str(CLIP))
    with pytest.raises(VidDetError, match='offline only'):
        next(run_video(model, source, mode='online'))
    source.close()
