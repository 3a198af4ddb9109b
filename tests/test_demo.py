"""``viddet demo`` end to end, in-process through ``viddet.cli.main``: annotated MP4 + JSON lines on
real frames with a real-format (MMTracking file layout) R-50 checkpoint, equality with the Python
API, and bad inputs (message, exit status 2, nothing left behind)."""
import json
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from viddet import VID_CLASSES
from viddet.cli import main
from viddet.demo import default_outputs

RECORD_KEYS = {'frame', 'file', 'boxes', 'scores', 'labels', 'names'}


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def dff_checkpoint(tmp_path_factory):
    """MMTracking-format DFF R-50 checkpoint (deterministic seed-0 weights, 400 MB), made once."""
    parity = Path(__file__).resolve().parents[2] / 'shared' / 'parity'
    if not parity.exists():
        pytest.skip(f'{parity} is absent: this test needs the shared parity fixtures beside the repository')
    path = tmp_path_factory.mktemp('ckpt') / 'dff_r50_seed0.pth'
    subprocess.run([sys.executable, str(parity / 'make_checkpoint.py'), str(parity / 'keys' / 'dff_r50.txt'),
                    str(path), '--seed', '0'], check=True)
    yield path
    path.unlink()


def read_mp4(path):
    """(decoded BGR frames, average fps) of an MP4."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format='bgr24') for f in c.decode(stream)]
        return frames, stream.average_rate


def read_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def demo(*args):
    return main(['demo', *map(str, args), '--device', 'cpu'])


# ------------------------------------------------------------------------------------ real runs
@pytest.mark.parametrize('source,method,size,fps,names', [
    ('ILSVRC2015_val_00007010', 'dff', (1280, 720), 25, ['000000.JPEG', '000001.JPEG']),
    ('street_8frames_1080p.mp4', 'single', (1920, 1080), 3, ['000000', '000001']),
])
def test_demo_end_to_end_matches_the_api(source, method, size, fps, names, shared, dff_checkpoint, tmp_path,
                                         capsys):
    from viddet.api import VideoDetector
    from viddet.data.sources import open_source
    src = shared('data', source)
    out = tmp_path / 'out.mp4'
    rc = demo(src, '--method', method, '--checkpoint', dff_checkpoint, '--max-frames', 2, '--out', out)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f'viddet demo: {method} on {src} (2 frames, offline mode, cpu)' in err
    assert f'wrote {out} and {out.with_suffix(".jsonl")}' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.jsonl', 'out.mp4']   # no temporary files

    frames, rate = read_mp4(out)
    assert len(frames) == 2 and rate == fps
    assert all(f.shape == (size[1], size[0], 3) for f in frames)
    with open_source(str(src), max_frames=2) as s:
        originals = [f.image for f in s]
    for drawn, original in zip(frames, originals):   # the input frames, boxes drawn on some pixels
        diff = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2)
        assert np.median(diff) <= 4

    records = read_records(out.with_suffix('.jsonl'))
    assert [r['frame'] for r in records] == [0, 1] and [r['file'] for r in records] == names
    w, h = size
    for r in records:
        assert set(r) == RECORD_KEYS
        n = len(r['boxes'])
        assert 0 < n <= 100 and len(r['scores']) == len(r['labels']) == len(r['names']) == n
        boxes = np.array(r['boxes'])
        assert boxes.shape == (n, 4)
        assert boxes.min() >= 0 and boxes[:, [0, 2]].max() <= w + 0.01 and boxes[:, [1, 3]].max() <= h + 0.01
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert r['scores'] == sorted(r['scores'], reverse=True) and min(r['scores']) > 0
        assert r['names'] == [VID_CLASSES[c] for c in r['labels']]

    detector = VideoDetector.from_checkpoint(str(dff_checkpoint), method=method, device='cpu')
    direct = list(detector.predict(str(src), max_frames=2))
    assert len(direct) == 2
    for r, d in zip(records, direct):
        det = d.detections
        assert r['labels'] == det.labels.tolist()
        np.testing.assert_allclose(r['boxes'], det.boxes.double().numpy(), atol=0.005 + 1e-6, rtol=0)
        np.testing.assert_allclose(r['scores'], det.scores.double().numpy(), atol=0.00005 + 1e-7, rtol=0)


def test_default_output_names(tmp_path):
    assert default_outputs('/data/ILSVRC2015_val_00007010/', 'selsa', None, None) == (
        Path('ILSVRC2015_val_00007010_selsa.mp4'), Path('ILSVRC2015_val_00007010_selsa.jsonl'))
    assert default_outputs('clip.mp4', 'fgfa', str(tmp_path / 'o.mp4'), None) == (
        tmp_path / 'o.mp4', tmp_path / 'o.jsonl')
    assert default_outputs('clip.mp4', 'fgfa', None, str(tmp_path / 'd.jsonl')) == (
        Path('clip_fgfa.mp4'), tmp_path / 'd.jsonl')


# ------------------------------------------------------------------------------------ bad inputs
def write_frames(folder: Path, n: int, truncate=None):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        ok, data = cv2.imencode('.jpg', rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        data = data.tobytes()
        if i == truncate:
            data = data[:len(data) // 2]
        (folder / f'{i:06d}.jpg').write_bytes(data)
    return folder


def assert_failed(rc, capsys, *fragments):
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err[err.index('viddet demo: error: '):]
    for f in fragments:
        assert f in line, line
    assert 'Traceback' not in err
    return line


def test_truncated_jpeg_mid_video_keeps_the_frames_before_it(tmp_path, capsys):
    frames = write_frames(tmp_path / 'frames', 4, truncate=2)
    out = tmp_path / 'out' / 'video.mp4'
    out.parent.mkdir()
    rc = demo(frames, '--random-weights', '--method', 'single', '--out', out)
    line = assert_failed(rc, capsys, f'frame 2 ({frames / "000002.jpg"}) is a truncated or corrupt JPEG',
                         f'the outputs hold the 2 frames before it: {out}, {out.with_suffix(".jsonl")}')
    assert line
    assert sorted(p.name for p in out.parent.iterdir()) == ['video.jsonl', 'video.mp4']
    mp4, _ = read_mp4(out)
    assert len(mp4) == 2 and mp4[0].shape == (48, 64, 3)
    assert [r['file'] for r in read_records(out.with_suffix('.jsonl'))] == ['000000.jpg', '000001.jpg']


def test_random_weights_prints_its_warning(tmp_path, capsys):
    frames = write_frames(tmp_path / 'frames', 1)
    out = tmp_path / 'o.mp4'
    rc = demo(frames, '--random-weights', '--method', 'single', '--out', out, '--fps', 12)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert 'WARNING: --random-weights: the model is randomly initialised; the detections are meaningless' in err
    mp4, rate = read_mp4(out)
    assert len(read_records(out.with_suffix('.jsonl'))) == 1 and len(mp4) == 1 and rate == 12


@pytest.mark.parametrize('case', ['missing', 'empty', 'text', 'single_image', 'no_out_folder', 'no_json_folder',
                                  'max_frames_0', 'max_frames_negative', 'fps_0', 'read_ahead_fails'])
def test_bad_inputs(case, tmp_path, capsys):
    out = tmp_path / 'out' / 'result.mp4'
    out.parent.mkdir()
    args = ['--random-weights', '--method', 'single', '--out', out]
    if case == 'missing':
        src = tmp_path / 'nope'
        expect = [f'{src} does not exist']
    elif case == 'empty':
        src = tmp_path / 'empty'
        src.mkdir()
        (src / 'notes.txt').write_text('no frames here')
        expect = [f'{src} contains no images']
    elif case == 'text':
        src = tmp_path / 'clip.mp4'
        src.write_text('this is not a video\n')
        expect = [f'{src} is not a video PyAV can decode']
    elif case == 'single_image':
        src = write_frames(tmp_path / 'frames', 1) / '000000.jpg'
        expect = [f'{src} is a single image: give the folder that contains the frames']
    elif case == 'no_out_folder':
        src = write_frames(tmp_path / 'frames', 1)
        bad = tmp_path / 'missing' / 'x.mp4'
        args = ['--random-weights', '--method', 'single', '--out', bad, '--json', out.with_suffix('.jsonl')]
        expect = [f'output folder {bad.parent} does not exist (for {bad})']
    elif case == 'no_json_folder':
        src = write_frames(tmp_path / 'frames', 1)
        bad = tmp_path / 'missing' / 'x.jsonl'
        args += ['--json', bad]
        expect = [f'output folder {bad.parent} does not exist (for {bad})']
    elif case == 'max_frames_0':
        src = write_frames(tmp_path / 'frames', 2)
        args += ['--max-frames', 0]
        expect = ['--max-frames must be at least 1, got 0']
    elif case == 'max_frames_negative':
        src = write_frames(tmp_path / 'frames', 2)
        args += ['--max-frames', -3]
        expect = ['--max-frames must be at least 1, got -3']
    elif case == 'fps_0':
        src = write_frames(tmp_path / 'frames', 1)
        args += ['--fps', 0]
        expect = ['--fps must be positive, got 0']
    elif case == 'read_ahead_fails':
        # offline FGFA reads 15 frames ahead: the broken frame 1 fails frame 0, so nothing is written
        src = write_frames(tmp_path / 'frames', 3, truncate=1)
        args = ['--random-weights', '--method', 'fgfa', '--out', out]
        expect = [f'frame 1 ({src / "000001.jpg"}) is a truncated or corrupt JPEG']
    rc = demo(src, *args)
    assert_failed(rc, capsys, *expect)
    assert list(out.parent.iterdir()) == []      # no output and no temporary file left behind


def test_checkpoint_of_another_method(tmp_path, capsys, dff_checkpoint, shared):
    src = shared('data', 'ILSVRC2015_val_00007010')
    out = tmp_path / 'out.mp4'
    rc = demo(src, '--method', 'selsa', '--checkpoint', dff_checkpoint, '--max-frames', 1, '--out', out)
    assert_failed(rc, capsys, f'{dff_checkpoint} does not fit this model; it looks like a DFF R-50 checkpoint.',
                  'missing keys: detector.roi_head.bbox_head.aggregator.0', 'unexpected keys: motion.conv1.0.conv.weight')
    assert list(tmp_path.iterdir()) == []


def test_unknown_checkpoint_name_and_no_command(tmp_path, capsys):
    frames = write_frames(tmp_path / 'frames', 1)
    rc = demo(frames, '--checkpoint', 'selsa_r18', '--out', tmp_path / 'o.mp4')
    assert_failed(rc, capsys, "'selsa_r18' is neither a checkpoint file, a URL nor a model-zoo name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ['frames']
    assert main([]) == 2
