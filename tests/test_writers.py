"""MP4 and JSON-lines writers: round trips, atomic outputs, partial results, bad input."""
import json
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from viddet import VidDetError
from viddet.data.sources import open_source
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


def test_mp4_error_inside_with_removes_temp_and_keeps_old_output(tmp_path):
    out = tmp_path / 'out.mp4'
    out.write_bytes(b'previous result')
    with pytest.raises(RuntimeError, match='model failed'):
        with VideoWriter(out, fps=10) as writer:
            writer.write(_image(0, 32, 48))
            raise RuntimeError('model failed')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.mp4']
    assert out.read_bytes() == b'previous result'


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
    with pytest.raises(VidDetError, match=rf'output folder {missing} does not exist'):
        VideoWriter(missing / 'out.mp4', fps=10)
    with pytest.raises(VidDetError, match=rf'output folder {missing} does not exist'):
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
    partial = tmp_path / 'dets.jsonl.partial'
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
