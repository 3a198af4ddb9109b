"""MP4 and JSON-lines writers: round trips, atomic outputs, partial results, bad input."""
import errno
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from viddet import VidDetError
from viddet.data.sources import open_source
from viddet.data.output_paths import check_output_path, check_outputs
from viddet.data.writers import JsonLinesWriter, VideoWriter, read_jsonl
from viddet.structures import Detections


def _image(i, h, w):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([20 + x * 2 + i * 3, 30 + y * 3, np.full_like(x, 60 + 10 * i)], -1)  # smooth, < 256
    img = img.astype(np.uint8)
    img[8:24, 4 * i:4 * i + 16] = (0, 0, 255)  # a red square moving right by 4 px per frame
    return img


def test_mp4_round_trip_odd_size(tmp_path):
    n, h, w = 12, 49, 81   # odd sizes are padded to 50 x 82 for yuv420p
    frames = [_image(i, h, w) for i in range(n)]
    out = tmp_path / 'out.mp4'
    with VideoWriter(out, fps=Fraction(30000, 1001)) as writer:
        for f in frames:
            writer.write(f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.mp4']  # temp file renamed away
    with av.open(str(out)) as c:
        cc = c.streams.video[0].codec_context
        assert cc.pix_fmt == 'yuv420p'
        assert cc.name == ('h264' if 'libx264' in av.codecs_available else 'mpeg4')
    with open_source(str(out)) as src:
        assert (src.length, src.width, src.height) == (n, w + 1, h + 1)
        assert src.fps == pytest.approx(30000 / 1001)
        back = list(src)
    assert len(back) == n
    for i, (a, b) in enumerate(zip(back, frames)):
        assert np.abs(a.image[:h, :w].astype(int) - b.astype(int)).mean() < 4, i
        # the padding row / column replicate the last ones (not black)
        assert np.abs(a.image[h, :w].astype(int) - b[h - 1].astype(int)).mean() < 6
        assert np.abs(a.image[:h, w].astype(int) - b[:, w - 1].astype(int)).mean() < 6
        # the moving square is where it was drawn: red in the middle, background outside
        assert a.image[16, 4 * i + 8, 2] > 200 and a.image[16, 4 * i + 8, 0] < 60
    assert back[0].image[16, 4 * 11 + 8, 2] < 200


def test_mp4_fps_float_and_default(tmp_path):
    for fps, expected in [(3, 3.0), (None, 25.0), (12.5, 12.5)]:
        out = tmp_path / f'{fps}.mp4'
        with VideoWriter(out, fps=fps) as writer:
            for i in range(3):
                writer.write(_image(i, 32, 48))
        with open_source(str(out)) as src:
            assert src.fps == pytest.approx(expected)
            assert src.length == 3


def test_mp4_falls_back_to_mpeg4_without_libx264(tmp_path, monkeypatch):
    monkeypatch.setattr(av, 'codecs_available', set(av.codecs_available) - {'libx264'})
    out = tmp_path / 'fallback.mp4'
    frames = [_image(i, 48, 64) for i in range(5)]
    with VideoWriter(out, fps=5) as writer:
        for f in frames:
            writer.write(f)
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == 'mpeg4'
    with open_source(str(out)) as src:
        back = list(src)
    assert len(back) == 5
    for a, b in zip(back, frames):
        assert np.abs(a.image.astype(int) - b.astype(int)).mean() < 6


def test_mp4_error_inside_with_keeps_a_playable_partial_and_the_old_output(tmp_path):
    out = tmp_path / 'out.mp4'
    out.write_bytes(b'previous result')
    frames = [_image(i, 32, 48) for i in range(3)]
    with pytest.raises(RuntimeError, match='model failed'):
        with VideoWriter(out, fps=10) as writer:
            for f in frames:
                writer.write(f)
            raise RuntimeError('model failed')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.mp4', 'out.partial.mp4']
    assert out.read_bytes() == b'previous result'
    assert writer.kept == tmp_path / 'out.partial.mp4' and not writer.complete and writer.frames_written == 3
    with open_source(str(writer.kept)) as src:   # finished: it has its index and every frame
        back = list(src)
    assert src.length == 3 and len(back) == 3
    assert np.abs(back[2].image.astype(int) - frames[2].astype(int)).mean() < 4


def test_a_run_without_frames_leaves_nothing_and_an_old_partial_alone(tmp_path):
    for name, make in [('out.partial.mp4', lambda: VideoWriter(tmp_path / 'out.mp4')),
                       ('out.partial.jsonl', lambda: JsonLinesWriter(tmp_path / 'out.jsonl'))]:
        (tmp_path / name).write_bytes(b'partial result of an earlier run')
        writer = make()
        assert writer.abort() is None and writer.kept is None
        assert (tmp_path / name).read_bytes() == b'partial result of an earlier run'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.partial.jsonl', 'out.partial.mp4']


def test_mp4_bad_frames(tmp_path):
    with VideoWriter(tmp_path / 'a.mp4') as writer:
        writer.write(_image(0, 32, 48))
        with pytest.raises(VidDetError, match=r'frame 1 is 40x32 but the video is 48x32'):
            writer.write(_image(1, 32, 40))
        with pytest.raises(VidDetError, match=r'must be an \(H, W, 3\) uint8'):
            writer.write(np.zeros((32, 48, 3), np.float32))
    with pytest.raises(VidDetError, match='no frames were written'):
        VideoWriter(tmp_path / 'b.mp4').close()


def test_missing_output_folder(tmp_path):
    missing = tmp_path / 'no_such_dir'
    with pytest.raises(VidDetError, match=rf'{missing / "out.mp4"}: the folder {missing} does not exist'):
        VideoWriter(missing / 'out.mp4', fps=10)
    with pytest.raises(VidDetError, match=rf'{missing / "out.jsonl"}: the folder {missing} does not exist'):
        JsonLinesWriter(missing / 'out.jsonl')


def _dets(boxes, scores, labels):
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(scores, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64))


def test_jsonl_round_trip(tmp_path):
    out = tmp_path / 'dets.jsonl'
    with JsonLinesWriter(out) as writer:
        writer.write(0, '000000.JPEG', _dets([[10.123, 20.456, 300.999, 400.0], [1, 2, 3, 4]],
                                             [0.87654, 0.5], [0, 29]))
        writer.write(1, '000001.JPEG', Detections.empty())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dets.jsonl']
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1]) == {'frame': 1, 'file': '000001.JPEG', 'boxes': [], 'scores': [],
                                    'labels': [], 'names': []}
    records = read_jsonl(out)
    assert records[0] == {'frame': 0, 'file': '000000.JPEG',
                          'boxes': [[10.12, 20.46, 301.0, 400.0], [1.0, 2.0, 3.0, 4.0]],
                          'scores': [0.8765, 0.5], 'labels': [0, 29], 'names': ['airplane', 'zebra']}
    assert records[1]['frame'] == 1


def test_jsonl_keeps_partial_records_on_error(tmp_path):
    out = tmp_path / 'dets.jsonl'
    with pytest.raises(RuntimeError, match='crash at frame 2'):
        with JsonLinesWriter(out, class_names=['a', 'b']) as writer:
            writer.write(0, 'f0', _dets([[0, 0, 5, 5]], [0.9], [1]))
            writer.write(1, 'f1', _dets([], [], []))
            # flushed as it goes: a reader already sees both records before the crash
            assert [r['frame'] for r in read_jsonl(writer.partial_path)] == [0, 1]
            raise RuntimeError('crash at frame 2')
    assert not out.exists()
    partial = tmp_path / 'dets.partial.jsonl'
    assert writer.kept == partial and writer.frames_written == 2
    assert [r['names'] for r in read_jsonl(partial)] == [['b'], []]


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(VidDetError, match='missing.jsonl does not exist'):
        read_jsonl(tmp_path / 'missing.jsonl')
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"frame": 0, "boxes": [], "scores": [], "labels": []}\n{oops\n')
    with pytest.raises(VidDetError, match=r'bad\.jsonl, line 2: not valid JSON'):
        read_jsonl(bad)
    bad.write_text('[1, 2]\n')
    with pytest.raises(VidDetError, match=r'bad\.jsonl, line 1: not a detection record'):
        read_jsonl(bad)


def test_jsonl_track_ids_only_when_linked(tmp_path):
    out = tmp_path / 'linked.jsonl'
    linked = _dets([[0, 0, 5, 5], [1, 1, 9, 9]], [0.9, 0.2], [0, 1])
    linked.track_ids = torch.tensor([3, -1])
    with JsonLinesWriter(out) as writer:
        writer.write(0, 'a', linked)
        writer.write(1, 'b', Detections.empty(with_tracks=True))
        writer.write(2, 'c', _dets([[0, 0, 5, 5]], [0.9], [0]))     # not linked: no key
    records = read_jsonl(out)
    assert [r.get('track_ids') for r in records] == [[3, -1], [], None]


# ------------------------------------------------------------------------------------ write failures
def _enospc(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_mp4_write_failure_names_the_file_and_keeps_the_frames_before(tmp_path, monkeypatch):
    out = tmp_path / 'out.mp4'
    writer = VideoWriter(out, fps=5)
    for i in range(2):
        writer.write(_image(i, 32, 48))
    monkeypatch.setattr(VideoWriter, '_append', _enospc)
    with pytest.raises(VidDetError, match=rf'^cannot write {tmp_path / "out.partial.mp4"}: No space left on device$'):
        writer.write(_image(2, 32, 48))
    monkeypatch.undo()
    assert writer.abort() == tmp_path / 'out.partial.mp4' and writer.frames_written == 2
    with open_source(str(writer.kept)) as src:
        assert len(list(src)) == 2
    assert not out.exists()


def test_jsonl_cut_after_the_last_complete_record_on_a_short_write(tmp_path, monkeypatch):
    out = tmp_path / 'd.jsonl'
    writer = JsonLinesWriter(out)
    for i in range(2):
        writer.write(i, f'f{i}', _dets([[0, 0, 5, 5]], [0.5], [0]))
    good = (tmp_path / 'd.partial.jsonl').stat().st_size
    real_write = os.write

    def half_then_full(fd, data):   # the disk fills up in the middle of a record
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'write', half_then_full)
    with pytest.raises(VidDetError, match='cannot write .*d.partial.jsonl: No space left on device'):
        writer.write(2, 'f2', _dets([[0, 0, 5, 5]], [0.5], [0]))
    monkeypatch.undo()
    assert (tmp_path / 'd.partial.jsonl').stat().st_size > good        # half a record is there ...
    assert writer.abort() == tmp_path / 'd.partial.jsonl'
    assert (tmp_path / 'd.partial.jsonl').stat().st_size == good       # ... and is cut off
    assert [r['file'] for r in read_jsonl(writer.kept)] == ['f0', 'f1'] and writer.frames_written == 2


def test_close_failure_removes_the_partial_and_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / 'out.mp4'
    out.write_bytes(b'complete earlier result')
    writer = VideoWriter(out, fps=5)
    writer.write(_image(0, 32, 48))
    monkeypatch.setattr(VideoWriter, '_finish', _enospc)
    with pytest.raises(VidDetError, match=r'cannot finish .*out.partial.mp4: No space left on device; it was removed'):
        writer.close()
    assert writer.kept is None and sorted(p.name for p in tmp_path.iterdir()) == ['out.mp4']
    assert out.read_bytes() == b'complete earlier result'


# ------------------------------------------------------------------------------------ output checks
def test_check_output_path_problems(tmp_path):
    (tmp_path / 'afile').write_text('x')
    (tmp_path / 'adir.mp4').mkdir()
    cases = [(tmp_path / 'afile' / 'o.mp4', f'--out {tmp_path / "afile" / "o.mp4"}: {tmp_path / "afile"} is a file, '
                                            f'not a folder'),
             (tmp_path / 'afile' / 'sub' / 'o.mp4', f'{tmp_path / "afile"} is a file, not a folder'),
             (tmp_path / 'nope' / 'o.mp4', f'the folder {tmp_path / "nope"} does not exist'),
             (tmp_path / 'adir.mp4', f'--out {tmp_path / "adir.mp4"}: {tmp_path / "adir.mp4"} is a folder; give a file name'),
             (Path('/proc/o.mp4'), '--out /proc/o.mp4: cannot create files in /proc (')]
    for path, message in cases:
        with pytest.raises(VidDetError) as e:
            check_output_path(path, '--out')
        assert message in str(e.value), (path, str(e.value))
    assert check_output_path(tmp_path / 'ok.mp4', '--out') == tmp_path / 'ok.mp4'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['adir.mp4', 'afile']     # the probe is gone


def test_check_outputs_refuses_inputs_and_collisions(tmp_path):
    video = tmp_path / 'v.mp4'
    video.write_bytes(b'the users video')
    (tmp_path / 'link.mp4').symlink_to(video)
    os.link(video, tmp_path / 'hard.mp4')
    cases = [
        ([('--out', video)], f'--out {video} is the input {video}: it would be overwritten; give another --out'),
        ([('--out', tmp_path / 'link.mp4')], f'--out {tmp_path / "link.mp4"} is the input {video}'),
        ([('--json', tmp_path / 'hard.mp4')], f'--json {tmp_path / "hard.mp4"} is the input {video}'),
        ([('--out', tmp_path / 'sub' / '..' / 'v.mp4')], 'is the input'),
        ([('--out', tmp_path / 'o.mp4'), ('--json', tmp_path / 'o.mp4')],
         f'--out {tmp_path / "o.mp4"} and --json {tmp_path / "o.mp4"} would write the same file {tmp_path / "o.mp4"}'),
        ([('--out', tmp_path / 'o.mp4'), ('--json', tmp_path / 'o.partial.mp4')],
         f'--out {tmp_path / "o.mp4"} and --json {tmp_path / "o.partial.mp4"} would write the same file '
         f'{tmp_path / "o.partial.mp4"}'),
    ]
    (tmp_path / 'sub').mkdir()
    for outputs, message in cases:
        with pytest.raises(VidDetError) as e:
            check_outputs(outputs, [video])
        assert message in str(e.value), (outputs, str(e.value))
    partial_input = tmp_path / 'clip.partial.mp4'
    partial_input.write_bytes(b'x')
    with pytest.raises(VidDetError, match=r'--out .*clip.mp4 is the input .*clip.partial.mp4 \(through its partial file'):
        check_outputs([('--out', tmp_path / 'clip.mp4')], [partial_input])
    assert check_outputs([('--out', tmp_path / 'o.mp4'), ('--json', tmp_path / 'o.jsonl')], [video]) == [
        tmp_path / 'o.mp4', tmp_path / 'o.jsonl']
    assert video.read_bytes() == b'the users video'
