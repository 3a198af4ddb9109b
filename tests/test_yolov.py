"""YOLOV / YOLOV++: how a checkpoint is recognised, the batching of a video, clipping, the modes
and the model zoo. The parity with the official code's own outputs, on every reference file, is in
``tests/test_yolov_parity.py``.
"""
import dataclasses
import hashlib
import json
import socket
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from viddet.checkpoints.download import resolve_checkpoint, resolve_init_weights
from viddet.checkpoints.loading import load_model
from viddet.checkpoints.zoo import YOLOV_ZOO
from viddet.data.image_sources import ArraySource
from viddet.engine.video import run_video
from viddet.errors import VidDetError
from viddet.methods import method_of_keys
from viddet.methods.yolov import (YOLOV, YOLOVPP, YOLOVSettings, clip_detections, variant_of_state,
                                   video_batches)
from viddet.models.yolox import PAFPN, letterbox, letterbox_ratio
from viddet.structures import Detections
from yolov_refs import as_compare, compare, frame_files, ref_frames, yolov_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures('one_thread')

MODELS = {'yolov_s': YOLOV, 'yolovpp_s': YOLOVPP, 'yolov_l': YOLOV, 'yolovpp_l': YOLOVPP}
FAST = ['yolov_s', 'yolovpp_s']
SLOW = [pytest.param('yolov_l', marks=pytest.mark.slow), pytest.param('yolovpp_l', marks=pytest.mark.slow)]
PER_FRAME = 3


@pytest.fixture(scope='module')
def case(yolov_dir, parity_checkpoint):
    """``get(model)``: (reference JSON, loaded model)."""
    def get(name):
        ref = json.loads((yolov_dir / f'ref_{name}_vid7010_first12_seed0.json').read_text())
        loaded = load_model(str(parity_checkpoint(f'{name}.txt', 0, yolov_dir)))
        assert type(loaded.model) is MODELS[name]
        return ref, loaded.model
    return get


# ------------------------------------------------------------------------------------ units
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


# ------------------------------------------------------------------------------------ batching
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


# ------------------------------------------------------------------------------------ online
def head_rows_to_detections(rows, ratio):
    return Detections(rows[:, :4] / ratio, rows[:, 4] * rows[:, 5], rows[:, 6].long())


def run_online(model, images, memory):
    """Online over a stream of unknown length (a generator: no read-ahead possible), raw boxes."""
    model.memory, model.clip = memory, False
    try:
        return [r.detections for r in run_video(model, ArraySource(iter(images)), mode='online')]
    finally:
        model.memory, model.clip = 31, True


@pytest.mark.parametrize('name', FAST)
def test_online_last_frame_of_the_clip_is_the_official_batch_detection(name, case, compare):
    """With a memory covering the whole 12-frame clip, online frame 11 attends to the candidates of
    frames 0..11: exactly what the official code computes for frame 11 of its one 12-frame batch (the
    fixtures). Frame 0 has no past: the head's single-frame results (YOLOV: the still-image
    detections of its candidates, in the fixtures; YOLOV++: the candidates themselves)."""
    ref, model = case(name)
    images = [cv2.imread(str(p)) for p in frame_files()]
    dets = run_online(model, images, memory=31)
    assert len(dets) == 12
    expected = ref_frames(ref)[-1:]
    matched, total, per_frame = compare.match(expected, as_compare(dets[-1:]))
    assert total >= 50 and matched == total and per_frame[0][2] == total, f'{name} frame 11: {matched}/{total}'
    if name == 'yolov_s':
        expected = ref_frames(ref, 'still_detections')[:1]
        matched, total, per_frame = compare.match(expected, as_compare(dets[:1]))
        assert total >= 20 and matched == total and per_frame[0][2] == total
    else:
        assert len(dets[0].scores) == len(ref['frames'][0]['selected_anchor_idx'])


@pytest.mark.parametrize('name', FAST)
def test_online_frame_is_the_head_on_the_window_of_its_past_frames(name, case, compare):
    """A memory of 2 frames over 4 frames: online frame t equals the last frame of the head's batch
    forward over frames [max(0, t - 2), t] (a second path: ``model(imgs)``, backbone and head on the
    stacked window); frame 3's window has dropped frame 0."""
    _, model = case(name)
    images = [cv2.imread(str(p)) for p in frame_files()[:4]]
    online = run_online(model, images, memory=2)
    imgs = torch.stack([letterbox(im)[0] for im in images])
    ratio = letterbox_ratio(images[0].shape[:2], 576)
    for t in range(4):
        with torch.no_grad():
            rows = model(imgs[max(0, t - 2):t + 1]).detections[-1]
        expected = as_compare([head_rows_to_detections(rows, ratio)])
        matched, total, per_frame = compare.match(expected, as_compare(online[t:t + 1]))
        assert total >= 20 and matched == total and per_frame[0][2] == total, f'{name} frame {t}: {matched}/{total}'
    with torch.no_grad():   # the memory matters: frame 3 alone gives other detections
        alone = model(imgs[3:4]).detections[-1]
    assert len(alone) != len(online[3].scores) or not torch.allclose(alone[:, 4] * alone[:, 5], online[3].scores)


def tiny_yolov(cls=YOLOV, memory=3):
    """A YOLOV(++) of width 1/8 (random weights): the real pipeline at a small cost. Objectness is
    pushed to ~0 on the stride-8 and -16 levels, so that YOLOV++'s obj · cls >= 0.001 rule keeps
    about the 324 anchors of the stride-32 level instead of all 6804 (whose attention over 4 frames
    would need ~12 GB)."""
    model = cls(PAFPN(0.33, 0.125), cls.head_class(30, 0.125), 'yolox_s', memory=memory).eval()
    with torch.no_grad():
        for level in model.head.obj_preds[:2]:
            level.bias.fill_(-30.0)
    return model


@pytest.mark.parametrize('cls, length', [(YOLOV, 40), (YOLOVPP, 8)])
def test_online_memory_is_flat_in_the_video_length(cls, length):
    """A stream (unknown length) much longer than a 3-frame memory: after every frame the memory
    holds the candidates of at most 3 frames (3 tensors each, each of one frame's size), and it is
    emptied after the video. (YOLOV++'s tiny model keeps 324 candidates a frame, 4 x more than
    YOLOV's 30 in its attention over 4 frames: a shorter stream keeps it fast.)"""
    torch.manual_seed(0)
    model = tiny_yolov(cls, memory=3)
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(length))
    sizes = []
    for i, r in enumerate(run_video(model, ArraySource(frames), mode='online')):
        assert r.frame.index == i
        stored = [t for c in model._memory for t in (c.rows, c.cls_feat, c.reg_feat)]
        sizes.append(len(stored))
        assert all(t.dim() == 2 and 0 < t.shape[0] <= 324 for t in stored)
    assert sizes == [3, 6] + [9] * (length - 2)
    assert len(model._memory) == 0   # reset after the video


def test_online_memory_zero_gives_the_single_frame_results(case, compare):
    ref, model = case('yolov_s')
    images = [cv2.imread(str(p)) for p in frame_files()[:2]]
    dets = run_online(model, images, memory=0)
    matched, total, per_frame = compare.match(ref_frames(ref, 'still_detections')[:2], as_compare(dets))
    assert total >= 40 and matched == total and [o for _, _, o in per_frame] == [m for m, _, _ in per_frame]


def test_online_settings_and_read_ahead():
    model = YOLOV.build('yolox_s')
    assert model.memory == 31 and YOLOVSettings().memory == 31
    assert model.read_ahead('online') == 0 and model.read_ahead('offline') == 31
    with pytest.raises(ValueError, match='memory must be >= 0'):
        YOLOVSettings(memory=-1)


def test_online_runs_under_bf16_autocast():
    """``--amp bf16`` (benchmark, training) wraps the forward in a CPU autocast: the online path
    (candidates in bf16 features, attention, NMS) runs and gives finite boxes and scores."""
    torch.manual_seed(0)
    model = tiny_yolov(YOLOV, memory=2)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        dets = [r.detections for r in run_video(model, ArraySource(frames), mode='online')]
    assert len(dets) == 3 and all(len(d.scores) for d in dets)
    assert all(bool(torch.isfinite(d.boxes).all() and torch.isfinite(d.scores).all()) for d in dets)


# ------------------------------------------------------------------------------------ model zoo
def fake_gdown(monkeypatch, payload=None, error=None):
    """A stand-in for the optional package ``gdown`` (tests never reach the network): ``download``
    writes ``payload`` to ``output`` (the way gdown does: its own partial file, then a move) or
    raises ``error`` after leaving a partial file. Returns the list of requested file ids."""
    calls = []

    def download(id=None, output=None, quiet=False):
        calls.append(id)
        partial = Path(output + 'gdown.part')
        partial.write_bytes(b'half')
        if error is not None:
            raise error
        partial.write_bytes(payload)
        partial.replace(output)
        return output

    module = types.ModuleType('gdown')
    module.download = download
    monkeypatch.setitem(sys.modules, 'gdown', module)
    return calls


def test_zoo_names_resolve_to_the_right_method_and_backbone(yolov_dir):
    """Each released video model's zoo name is the name of its key list in the fixtures: the method
    and backbone recorded in the table are the ones viddet reads off those keys. The still-image
    bases have no method (they are training's starting points)."""
    from conftest import read_keys
    from viddet.methods.yolov import VARIANTS
    video = {k: v for k, v in YOLOV_ZOO.items() if v.method is not None}
    assert sorted(video) == sorted(p.stem for p in (yolov_dir / 'keys').glob('*.txt'))
    for name, entry in video.items():
        keys = read_keys(yolov_dir / 'keys' / f'{name}.txt')
        assert method_of_keys(keys).name == entry.method, name
        state = {k: torch.empty(s, device='meta') for k, s in keys.items()}
        assert variant_of_state(state) == entry.backbone, name
    bases = {k: v for k, v in YOLOV_ZOO.items() if v.method is None}
    assert sorted(bases) == ['yolox_l_vid', 'yolox_s_vid', 'yolox_swinbase_vid', 'yolox_swintiny_vid', 'yolox_x_vid']
    assert {v.backbone for v in bases.values()} <= set(VARIANTS) | {v.backbone for v in video.values()}
    assert YOLOV.default_checkpoint == 'yolov_s' and YOLOVPP.default_checkpoint == 'yolovpp_s'
    assert all(v.sha256 is None for v in YOLOV_ZOO.values())   # none published: recorded at first use
    assert sum(v.drive_id is not None for v in YOLOV_ZOO.values()) == 11


@pytest.mark.parametrize('method, cls, keys', [('yolov', YOLOV, 'yolov_s.txt'), ('yolovpp', YOLOVPP, 'yolovpp_s.txt')])
def test_default_checkpoint_downloads_once_and_is_hash_checked(method, cls, keys, yolov_dir, parity_checkpoint,
                                                               home, monkeypatch):
    """No --checkpoint: the method's zoo file, fetched from Google Drive through gdown once, loads as
    the right model; its SHA-256 is recorded at the first download and a changed file is refused."""
    payload = parity_checkpoint(keys, 0, yolov_dir).read_bytes()
    calls = fake_gdown(monkeypatch, payload)
    loaded = load_model(method=method, progress=False)
    name = cls.default_checkpoint
    dest = home / 'checkpoints' / f'{name}.pth'
    assert type(loaded.model) is cls and loaded.model.variant == 'yolox_s' and loaded.path == dest
    assert calls == [YOLOV_ZOO[name].drive_id]
    assert dest.read_bytes() == payload
    record = dest.with_name(dest.name + '.sha256')
    assert record.read_text().split() == [hashlib.sha256(payload).hexdigest()]
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([dest.name, record.name])   # no partial file
    assert resolve_checkpoint(name, progress=False) == dest and len(calls) == 1   # cached: not fetched again
    with dest.open('ab') as f:
        f.write(b'\0')
    with pytest.raises(VidDetError, match=f'{dest}: its SHA-256 .* is not the .* recorded in {record.name} at its '
                                          f'first use: the file is damaged or was replaced; delete it'):
        resolve_checkpoint(name, progress=False)


def test_drive_download_offline_is_one_clear_line(home, monkeypatch):
    """As for MMTracking files: the URL, the reason, where to put a file downloaded elsewhere, and
    the --checkpoint alternative, on one line; nothing is left in the cache (gdown's partial file
    included)."""
    error = ConnectionError("HTTPSConnectionPool(host='drive.google.com', port=443): Max retries exceeded\n"
                            "  (Caused by NameResolutionError('Failed to resolve drive.google.com'))")
    calls = fake_gdown(monkeypatch, error=error)
    dest = home / 'checkpoints' / 'yolov_l.pth'
    with pytest.raises(VidDetError) as e:
        resolve_checkpoint('yolov_l', progress=False)
    msg = str(e.value)
    assert '\n' not in msg and calls == ['1qZ-3iPDlYx1OKe6zz_-n42ceijo_Ntx6']
    assert msg.startswith(f'could not download {YOLOV_ZOO["yolov_l"].url} (ConnectionError: HTTPSConnectionPool')
    assert msg.endswith(f'Without network access, download it elsewhere and put it at {dest}, '
                        f'or pass --checkpoint /path/to/file.pth')
    assert list(dest.parent.iterdir()) == []


def test_gdown_missing_says_how_to_install_it(home, monkeypatch):
    monkeypatch.setitem(sys.modules, 'gdown', None)   # import gdown raises ImportError
    dest = home / 'checkpoints' / 'yolovpp_l.pth'
    with pytest.raises(VidDetError) as e:
        resolve_checkpoint('yolovpp_l', progress=False)
    msg = str(e.value)
    assert '\n' not in msg
    assert msg.startswith('yolovpp_l is on Google Drive, which needs the optional package gdown: '
                          'pip install "viddet[yolov]" (or gdown); or download https://drive.google.com/file/d/')
    assert f'put it at {dest}, or pass --checkpoint' in msg
    with pytest.raises(VidDetError, match='set init.backbone_weights to the downloaded file'):
        resolve_init_weights('yolox_s_vid', 'init.backbone_weights', progress=False)   # the training bases too
    with pytest.raises(VidDetError, match=r'yolox_swinbase_vid is published as a Google Drive folder \(https://drive'
                                          r'.google.com/drive/folders/.*\), not as one file: download its checkpoint by '
                                          r'hand and put it at .*yolox_swinbase_vid.pth'):
        resolve_checkpoint('yolox_swinbase_vid', progress=False)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_hugging_face_file_through_the_ordinary_download(server, home, monkeypatch, tmp_path):
    """FocalLarge comes over HTTPS (no gdown): served here from a local server; then offline, and a
    published SHA-256 that the download does not have."""
    monkeypatch.setitem(sys.modules, 'gdown', None)
    payload = b'not really a checkpoint'
    (server.root / 'V++_FocalL.pth').write_bytes(payload)
    entry = YOLOV_ZOO['yolovpp_focallarge']
    monkeypatch.setitem(YOLOV_ZOO, 'yolovpp_focallarge', dataclasses.replace(entry, url=server.base + 'V%2B%2B_FocalL.pth'))
    path = resolve_checkpoint('yolovpp_focallarge', progress=False)
    assert path == home / 'checkpoints' / 'yolovpp_focallarge.pth' and path.read_bytes() == payload
    assert server.hits == ['/V%2B%2B_FocalL.pth']
    path.unlink()
    path.with_name(path.name + '.sha256').unlink()
    monkeypatch.setitem(YOLOV_ZOO, 'yolovpp_focallarge', dataclasses.replace(
        entry, url=server.base + 'V%2B%2B_FocalL.pth', sha256='0' * 64))
    with pytest.raises(VidDetError, match=r'downloaded .*FocalL.pth but its SHA-256 .* is not 000000000000…: the '
                                          r'file is corrupt or not the published one'):
        resolve_checkpoint('yolovpp_focallarge', progress=False)
    assert list(path.parent.iterdir()) == []
    with socket.socket() as s:      # a port on which nothing listens
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(YOLOV_ZOO, 'yolovpp_focallarge', dataclasses.replace(entry, url=f'http://127.0.0.1:{port}/x.pth'))
    with pytest.raises(VidDetError, match=rf'could not download http://127.0.0.1:{port}/x.pth \(.*\). Without network '
                                          rf'access, download it elsewhere and put it at {path}, or pass --checkpoint'):
        resolve_checkpoint('yolovpp_focallarge', progress=False)
