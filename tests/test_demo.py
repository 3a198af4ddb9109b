"""``viddet demo`` end to end, in-process through ``viddet.cli.main``: annotated MP4 + JSON lines on
real frames with a real-format (MMTracking file layout) R-50 checkpoint, equality with the Python
API, and bad inputs (message, exit status 2, nothing left behind)."""
import errno
import json
import os
import warnings
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from viddet import VID_CLASSES
from viddet.cli import main
from viddet.demo import default_outputs, plural
from viddet.structures import Detections
from scripted_method import ONLINE_IDS, SEQNMS_IDS, scripted_detector

RECORD_KEYS = {'frame', 'file', 'boxes', 'scores', 'labels', 'names'}


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def dff_checkpoint(parity_checkpoint):
    """MMTracking-format DFF R-50 checkpoint (deterministic seed-0 weights, 400 MB), made once."""
    return parity_checkpoint('dff_r50.txt')


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
@pytest.mark.parametrize('source,method,size,fps,names,link', [
    ('ILSVRC2015_val_00007010', 'dff', (1280, 720), 25, ['000000.JPEG', '000001.JPEG'], 'online'),
    ('street_8frames_1080p.mp4', 'single', (1920, 1080), 3, ['000000', '000001'], 'none'),
])
def test_demo_end_to_end_matches_the_api(source, method, size, fps, names, link, shared, dff_checkpoint, tmp_path,
                                         capsys):
    from viddet.api import VideoDetector
    from viddet.data.sources import open_source
    from viddet.linking.tracker import IoUTracker
    src = shared('data', source)
    out = tmp_path / 'out.mp4'
    rc = demo(src, '--method', method, '--checkpoint', dff_checkpoint, '--max-frames', 2, '--out', out, '--link', link)
    err = capsys.readouterr().err
    assert rc == 0, err
    linking = '' if link == 'none' else f', linking {link}'
    assert f'viddet demo: {method} on {src} (2 frames, offline mode{linking}, cpu)' in err
    from viddet.runtime import cpu_kernels
    assert f'viddet demo: fast paths, CPU kernels: {cpu_kernels()}\n' in err   # what ran, before any frame
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
        assert set(r) == RECORD_KEYS | ({'track_ids'} if link != 'none' else set())
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
    tracker = IoUTracker()
    for r, d in zip(records, direct):
        det = d.detections
        assert r['labels'] == det.labels.tolist()
        if link == 'online':
            assert r['track_ids'] == tracker.update(det).track_ids.tolist()
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
def write_frames(folder: Path, n: int, truncate=None, size=(64, 48)):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        ok, data = cv2.imencode('.jpg', rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
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


@pytest.mark.parametrize('case', ['missing', 'empty', 'text', 'single_image', 'no_out_folder', 'no_json_folder',
                                  'max_frames_0', 'max_frames_negative', 'fps_0', 'fps_nan', 'score_thr_5',
                                  'score_thr_negative', 'score_thr_nan', 'read_ahead_fails'])
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
        expect = [f'--out {bad}: the folder {bad.parent} does not exist']
    elif case == 'no_json_folder':
        src = write_frames(tmp_path / 'frames', 1)
        bad = tmp_path / 'missing' / 'x.jsonl'
        args += ['--json', bad]
        expect = [f'--json {bad}: the folder {bad.parent} does not exist']
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
        expect = ['--fps must be a positive number, got 0']
    elif case == 'fps_nan':
        src = write_frames(tmp_path / 'frames', 1)
        args += ['--fps', 'nan']
        expect = ['--fps must be a positive number, got nan']
    elif case.startswith('score_thr'):
        src = write_frames(tmp_path / 'frames', 1)
        value = {'score_thr_5': '5', 'score_thr_negative': '-1', 'score_thr_nan': 'nan'}[case]
        args += ['--score-thr', value]
        expect = [f'--score-thr must be in [0, 1], got {value}']
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


# ------------------------------------------------------------------------------------ scripted detections
def smooth_frames(folder: Path, n: int, size=(320, 240), truncate=None):
    """PNG frames of a smooth gradient (compress well, so drawn boxes dominate MP4 differences)."""
    folder.mkdir()
    y, x = np.mgrid[0:size[1], 0:size[0]]
    for i in range(n):
        img = np.stack([40 + x // 4, 60 + y // 4, np.full_like(x, 90 + 5 * i)], -1).astype(np.uint8)
        data = cv2.imencode('.png', img)[1].tobytes()
        (folder / f'{i:06d}.png').write_bytes(data[:len(data) // 2] if i == truncate else data)
    return folder


@pytest.fixture
def scripted(monkeypatch):
    """``viddet demo`` runs the scripted method (tests/scripted_method.py) instead of loading a model."""
    detector = scripted_detector()
    monkeypatch.setattr('viddet.api.detector_from_args', lambda args: detector)
    return detector


@pytest.fixture
def no_model(monkeypatch):
    def fail(args):
        raise AssertionError('the model was loaded')
    monkeypatch.setattr('viddet.api.detector_from_args', fail)


def earlier_results(out: Path):
    """Complete outputs of an earlier run at the final names; returns their bytes."""
    out.write_bytes(b'complete video of an earlier run')
    out.with_suffix('.jsonl').write_bytes(b'{"complete": "records of an earlier run"}\n')
    return out.read_bytes(), out.with_suffix('.jsonl').read_bytes()


def records_as_detections(record, with_ids=True):
    return Detections(torch.tensor(record['boxes'], dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(record['scores'], dtype=torch.float32), torch.tensor(record['labels']),
                      torch.tensor(record['track_ids']) if with_ids else None)


@pytest.mark.parametrize('link,mode,expected,tracks', [('online', 'online', ONLINE_IDS, 2),
                                                        ('seqnms', 'offline', SEQNMS_IDS, 3)])
def test_linked_json_and_video_carry_the_track_ids(link, mode, expected, tracks, scripted, tmp_path, capsys):
    from viddet.data.sources import open_source
    from viddet.visualize import draw_detections
    frames = smooth_frames(tmp_path / 'frames', 6)
    out = tmp_path / 'out.mp4'
    rc = demo(frames, '--out', out, '--link', link, '--mode', mode)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f'(6 frames, {mode} mode, linking {link}, cpu)' in err
    assert (f'linked with {link}: {tracks} tracks drawn (a box scoring >= 0.5), {tracks} in all; '
            f'wrote {out} and {out.with_suffix(".jsonl")}') in err
    records = read_records(out.with_suffix('.jsonl'))
    assert [r['track_ids'] for r in records] == expected
    assert [len(r['boxes']) for r in records] == [len(ids) for ids in expected]
    mp4, _ = read_mp4(out)
    with open_source(str(frames)) as s:
        originals = [f.image for f in s]
    assert len(mp4) == 6
    for drawn, original, r in zip(mp4, originals, records):
        with_ids = draw_detections(original, records_as_detections(r), VID_CLASSES)
        without = draw_detections(original, records_as_detections(r, with_ids=False), VID_CLASSES)
        where = (with_ids != without).any(-1)          # the pixels the ids change (labels, colours)
        assert where.sum() > 100
        err_with = np.abs(drawn[where].astype(int) - with_ids[where]).mean()
        err_without = np.abs(drawn[where].astype(int) - without[where]).mean()
        assert err_with < 0.5 * err_without, (err_with, err_without)   # the video shows the ids


def test_unlinked_records_have_no_track_ids_and_one_frame_is_one_frame(scripted, tmp_path, capsys):
    frames = smooth_frames(tmp_path / 'frames', 1)
    out = tmp_path / 'o.mp4'
    assert demo(frames, '--out', out) == 0
    err = capsys.readouterr().err
    assert '(1 frame, offline mode, cpu)' in err and 'viddet demo: 1 frame in ' in err
    assert 'track_ids' not in read_records(out.with_suffix('.jsonl'))[0]


def test_unknown_link_mode_and_seqnms_on_a_stream(scripted, tmp_path, capsys, monkeypatch):
    frames = smooth_frames(tmp_path / 'frames', 1)
    with pytest.raises(SystemExit) as e:
        demo(frames, '--link', 'tubes')
    assert e.value.code == 2
    assert "viddet demo: error: argument --link: invalid choice: 'tubes' (choose from" in capsys.readouterr().err
    from viddet.data.image_sources import ArraySource
    monkeypatch.setattr('viddet.data.sources.open_source',
                        lambda spec, max_frames=None: ArraySource(iter([]), path=spec))
    rc = demo('rtsp://camera/stream', '--link', 'seqnms', '--out', tmp_path / 'o.mp4')
    assert_failed(rc, capsys, '--link seqnms links the whole video before it writes a frame, and '
                              'rtsp://camera/stream is a live stream: use --link online')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['frames']


# ------------------------------------------------------------------------------------ outputs checked first
@pytest.mark.parametrize('case', ['out_is_the_video', 'json_is_the_video', 'json_is_out', 'out_is_a_frame',
                                  'out_is_a_later_frame', 'out_is_a_folder', 'out_folder_is_a_file', 'unwritable'])
def test_outputs_are_checked_before_the_model_loads(case, no_model, tmp_path, capsys):
    from viddet.data.writers import VideoWriter
    video = tmp_path / 'v.mp4'
    with VideoWriter(video, fps=5) as w:
        for i in range(3):
            w.write(np.full((48, 64, 3), 30 * i, np.uint8))
    frames = smooth_frames(tmp_path / 'frames', 3, size=(64, 48))
    src, args = video, []
    if case == 'out_is_the_video':
        args, expect = ['--out', video], f'--out {video} is the input {video}: it would be overwritten; give another --out'
    elif case == 'json_is_the_video':
        args, expect = ['--out', tmp_path / 'o.mp4', '--json', video], f'--json {video} is the input {video}'
    elif case == 'json_is_out':
        o = tmp_path / 'o.mp4'
        args, expect = ['--out', o, '--json', o], f'--out {o} and --json {o} would write the same file {o}'
    elif case == 'out_is_a_frame':
        src, f = frames, frames / '000001.png'
        args, expect = ['--out', f], f'--out {f} is the input {f}'
    elif case == 'out_is_a_later_frame':   # not read with --max-frames 1, still the user's frame
        src, f = frames, frames / '000002.png'
        args, expect = ['--out', tmp_path / 'o.mp4', '--json', f, '--max-frames', 1], f'--json {f} is the input {f}'
    elif case == 'out_is_a_folder':
        args, expect = ['--out', tmp_path / 'frames'], f'--out {frames}: {frames} is a folder; give a file name'
    elif case == 'out_folder_is_a_file':
        o = video / 'o.mp4'
        args, expect = ['--out', o], f'--out {o}: {video} is a file, not a folder'
    elif case == 'unwritable':
        args, expect = ['--out', '/proc/o.mp4', '--json', tmp_path / 'o.jsonl'], \
            '--out /proc/o.mp4: cannot create files in /proc ('
    before = {p: p.read_bytes() for p in [video, *frames.iterdir()]}
    rc = demo(src, *args)
    assert_failed(rc, capsys, expect)
    assert {p: p.read_bytes() for p in [video, *frames.iterdir()]} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['frames', 'v.mp4']


# ------------------------------------------------------------------------------------ stopped runs
def assert_partial(out: Path, frames: int, json_frames=None):
    """The partial outputs hold what the message said: ``frames`` video frames and JSON records."""
    mp4, _ = read_mp4(out.with_name(out.stem + '.partial.mp4'))
    records = read_records(out.with_name(out.stem + '.partial.jsonl'))
    assert len(mp4) == frames
    assert [r['frame'] for r in records] == list(range(frames if json_frames is None else json_frames))


def test_ctrl_c_exits_130_and_keeps_the_frames_so_far(scripted, monkeypatch, tmp_path, capsys):
    original = scripted.model.predict

    def predict(frame, ctx):
        if frame.index == 3:
            warnings.warn('a warning of the model', UserWarning)
            raise KeyboardInterrupt
        return original(frame, ctx)
    monkeypatch.setattr(scripted.model, 'predict', predict)
    frames = smooth_frames(tmp_path / 'frames', 6)
    out = tmp_path / 'out.mp4'
    earlier = earlier_results(out)
    with pytest.warns(UserWarning, match='a warning of the model'):   # other warnings are shown as usual
        rc = demo(frames, '--out', out, '--link', 'online')
    err = capsys.readouterr().err
    assert rc == 130, err
    p = tmp_path / 'out.partial'
    assert (f'viddet demo: stopped (SIGINT); kept the 3 frames finished before it: '
            f'{p}.mp4 (3 frames), {p}.jsonl (3 frames)') in err
    assert err.rstrip().endswith('viddet demo: interrupted (SIGINT)') and 'Traceback' not in err
    assert (out.read_bytes(), out.with_suffix('.jsonl').read_bytes()) == earlier
    assert_partial(out, 3)
    assert read_records(f'{p}.jsonl')[2]['track_ids'] == ONLINE_IDS[2]


@pytest.mark.parametrize('link', ['none', 'seqnms'])
def test_corrupt_frame_mid_folder_keeps_partials_and_the_earlier_result(link, scripted, tmp_path, capsys):
    frames = smooth_frames(tmp_path / 'frames', 5, truncate=2)
    out = tmp_path / 'out.mp4'
    earlier = earlier_results(out)
    rc = demo(frames, '--out', out, '--link', link)
    p = tmp_path / 'out.partial'
    if link == 'none':
        assert_failed(rc, capsys, f'frame 2 ({frames / "000002.png"}) is ',
                      f'kept the 2 frames finished before it: {p}.mp4 (2 frames), {p}.jsonl (2 frames)')
        assert_partial(out, 2)
    else:   # Seq-NMS stopped while detecting: nothing was written yet
        assert_failed(rc, capsys, f'frame 2 ({frames / "000002.png"}) is ',
                      'nothing was written (--link seqnms writes once the whole video is detected)')
        assert sorted(p.name for p in tmp_path.iterdir()) == ['frames', 'out.jsonl', 'out.mp4']
    assert (out.read_bytes(), out.with_suffix('.jsonl').read_bytes()) == earlier


def _enospc(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_says_what_was_kept(scripted, monkeypatch, tmp_path, capsys):
    from viddet.data.writers import JsonLinesWriter
    real = JsonLinesWriter._append
    calls = []

    def append(self, data):
        calls.append(1)
        if len(calls) == 3:
            _enospc()
        real(self, data)
    monkeypatch.setattr(JsonLinesWriter, '_append', append)
    frames = smooth_frames(tmp_path / 'frames', 6)
    out = tmp_path / 'out.mp4'
    earlier = earlier_results(out)
    rc = demo(frames, '--out', out)
    p = tmp_path / 'out.partial'
    assert_failed(rc, capsys, f'cannot write {p}.jsonl: No space left on device',
                  f'kept the 2 frames finished before it: {p}.mp4 (2 frames), {p}.jsonl (2 frames)')
    assert (out.read_bytes(), out.with_suffix('.jsonl').read_bytes()) == earlier
    assert_partial(out, 2)


@pytest.mark.parametrize('failing', ['video', 'json'])
def test_a_failure_to_finish_one_output_keeps_the_other(failing, scripted, monkeypatch, tmp_path, capsys):
    from viddet.data.writers import JsonLinesWriter, VideoWriter
    monkeypatch.setattr(VideoWriter if failing == 'video' else JsonLinesWriter, '_finish', _enospc)
    frames = smooth_frames(tmp_path / 'frames', 6)
    out = tmp_path / 'out.mp4'
    earlier_video, earlier_json = earlier_results(out)
    rc = demo(frames, '--out', out)
    jsonl = out.with_suffix('.jsonl')
    if failing == 'video':
        assert_failed(rc, capsys, f'cannot finish {tmp_path / "out.partial.mp4"}: No space left on device; it was '
                                  f'removed', f'kept: {jsonl} (6 frames)')
        assert out.read_bytes() == earlier_video
        assert [r['frame'] for r in read_records(jsonl)] == list(range(6))
    else:
        assert_failed(rc, capsys, f'cannot finish {tmp_path / "out.partial.jsonl"}: No space left on device',
                      f'kept: {out} (6 frames)')
        assert jsonl.read_bytes() == earlier_json
        assert len(read_mp4(out)[0]) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ['frames', 'out.jsonl', 'out.mp4']


def test_a_video_shorter_than_its_container_says_is_reported(scripted, tmp_path, capsys):
    from viddet.data.sources import open_source
    from viddet.data.writers import VideoWriter
    full = tmp_path / 'full.mp4'
    y, x = np.mgrid[0:240, 0:320]
    with VideoWriter(full, fps=8, options={'g': '1'}) as w:
        for i in range(8):
            w.write(np.stack([x // 2, y // 2, np.full_like(x, 20 * i)], -1).astype(np.uint8))
    cut = tmp_path / 'cut.mp4'
    data = full.read_bytes()
    cut.write_bytes(data[:len(data) * 55 // 100])   # fast start: the index (8 frames) comes first
    with open_source(str(cut)) as s:
        held = len(list(s))
        assert s.length == 8 and 0 < held < 8
    out = tmp_path / 'out.mp4'
    assert demo(cut, '--out', out) == 0
    err = capsys.readouterr().err
    warning = f'{cut}: the video ended after {plural(held)}, but its container announced 8'
    assert f'viddet demo: WARNING: {warning}' in err                                  # as it happens
    final = err[err.index(f'viddet demo: {plural(held)} in '):]
    assert f'wrote {out} and {out.with_suffix(".jsonl")}\n  WARNING: {warning}' in final   # and at the end
    assert len(read_mp4(out)[0]) == held and len(read_records(out.with_suffix('.jsonl'))) == held
