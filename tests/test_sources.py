"""Frame sources: ordering, real data, random access, prefetch thread, and every bad input."""
import threading
import time

import av
import cv2
import numpy as np
import pytest

from viddet import VidDetError
from viddet.data.frames import Frame
from viddet.data.image_sources import FolderSource
from viddet.data.sources import open_source
from viddet.data.video_sources import LiveSource, VideoFileSource
from viddet.data.writers import VideoWriter


def _image(i, h=48, w=64):
    """A frame with smooth content that differs per index (compresses well, so H.264 keeps it)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 3 + i * 5) % 256, (y * 4) % 256, np.full_like(x, 100)], -1).astype(np.uint8)
    img[10:30, i % (w - 20):i % (w - 20) + 20] = 255
    return img


def _folder(tmp_path, names, ext='.png'):
    for i, n in enumerate(names):
        cv2.imwrite(str(tmp_path / f'{n}{ext}'), _image(i))
    return tmp_path


def _video(path, n, **kwargs):
    with VideoWriter(path, fps=kwargs.pop('fps', 10), **kwargs) as w:
        for i in range(n):
            w.write(_image(i))
    return str(path)


def _decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith('viddet-decode')]


def _wait_no_decode_threads(seconds=10.0):
    end = time.time() + seconds
    while _decode_threads() and time.time() < end:
        time.sleep(0.02)
    return _decode_threads()


# ---------------------------------------------------------------- folders
def test_folder_sorted_by_numeric_stem(tmp_path):
    # written in this order: 2.jpg gets image 0, 10.jpg image 1, 1.jpg image 2
    _folder(tmp_path, ['2', '10', '1'], ext='.jpg')
    (tmp_path / 'notes.txt').write_text('not a frame')
    (tmp_path / '.3.jpg').write_bytes(b'hidden junk')
    with open_source(str(tmp_path)) as src:
        assert isinstance(src, FolderSource)
        assert (src.length, src.fps, src.is_live, src.width, src.height) == (3, None, False, 64, 48)
        frames = list(src)
    assert [f.name for f in frames] == ['1.jpg', '2.jpg', '10.jpg']
    assert [f.index for f in frames] == [0, 1, 2]
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (48, 64, 3)
        np.testing.assert_array_equal(f.image, cv2.imread(str(tmp_path / f.name)))


def test_folder_sorted_by_name_when_stems_not_numeric(tmp_path):
    _folder(tmp_path, ['b10', 'a', 'b2'])
    (tmp_path / 'c.JPEG').write_bytes(cv2.imencode('.jpg', _image(7))[1].tobytes())
    with open_source(tmp_path) as src:
        assert [f.name for f in src] == ['a.png', 'b10.png', 'b2.png', 'c.JPEG']


def test_folder_random_access_and_bounded_cache(tmp_path):
    _folder(tmp_path, [f'{i:06d}' for i in range(12)])
    with open_source(str(tmp_path), cache_frames=3) as src:
        frames = list(src)
        for i in [11, 0, 5, 5, 3, 11, 7, 1]:
            got = src.get(i)
            assert got.index == i and got.name == f'{i:06d}.png'
            np.testing.assert_array_equal(got.image, frames[i].image)
            assert len(src._cache) <= 3
        with pytest.raises(IndexError):
            src.get(12)
        with pytest.raises(IndexError):
            src.get(-1)


def test_folder_max_frames(tmp_path):
    _folder(tmp_path, [str(i) for i in range(6)])
    with open_source(str(tmp_path), max_frames=4) as src:
        assert src.length == 4
        assert [f.index for f in src] == [0, 1, 2, 3]


def test_real_imagenet_vid_folder(shared):
    folder = shared('data', 'ILSVRC2015_val_00007010')
    with open_source(str(folder), max_frames=3) as src:
        assert (src.length, src.width, src.height, src.fps) == (3, 1280, 720, None)
        frames = list(src)
    assert [f.name for f in frames] == ['000000.JPEG', '000001.JPEG', '000002.JPEG']
    for f in frames:  # parity with MMTracking: OpenCV's own decoder, BGR
        np.testing.assert_array_equal(f.image, cv2.imread(str(folder / f.name), cv2.IMREAD_COLOR))
    with open_source(str(folder)) as src:
        assert src.length == 144
        np.testing.assert_array_equal(src.get(143).image, cv2.imread(str(folder / '000143.JPEG')))


# ---------------------------------------------------------------- video files
def test_real_street_video(shared):
    path = shared('data', 'street_8frames_1080p.mp4')
    with open_source(str(path)) as src:
        assert isinstance(src, VideoFileSource)
        assert (src.length, src.width, src.height, src.is_live) == (8, 1920, 1080, False)
        assert src.fps == pytest.approx(3.0)
        frames = list(src)
        assert len(frames) == 8
        assert [f.name for f in frames][:2] == ['000000', '000001']
        assert all(f.image.shape == (1080, 1920, 3) and f.image.dtype == np.uint8 for f in frames)
        assert not np.array_equal(frames[0].image, frames[7].image)
        for i in [7, 0, 4, 3, 5]:  # random access gives the sequentially decoded pixels
            np.testing.assert_array_equal(src.get(i).image, frames[i].image)
    # a second, independent decoder (PyAV directly)
    with av.open(str(path)) as c:
        ref = [f.to_ndarray(format='bgr24') for f in c.decode(video=0)]
    for a, b in zip(frames, ref):
        np.testing.assert_array_equal(a.image, b)


@pytest.mark.parametrize('container', ['mp4', 'mkv'])
def test_video_random_access_is_exact_and_decodes_each_frame_once(tmp_path, container):
    n = 40
    path = _video(tmp_path / 'v.mp4', n, options={'g': 6, 'bf': 2})  # keyframe every 6 frames
    if container == 'mkv':  # remux: Matroska stores no frame count, so length comes from packets
        src_c, out = av.open(path), av.open(str(tmp_path / 'v.mkv'), 'w')
        st = out.add_stream_from_template(src_c.streams.video[0])
        for p in src_c.demux(src_c.streams.video[0]):
            if p.dts is not None:
                p.stream = st
                out.mux(p)
        out.close(), src_c.close()
        path = str(tmp_path / 'v.mkv')
    with open_source(path, cache_frames=20) as src:
        assert src.length == n
        seq = [f.image for f in src]
        decodes = [0]
        decode_next = src._decode_next

        def counting():
            decodes[0] += 1
            return decode_next()
        src._decode_next = counting

        # SELSA: 14 references spread over the video; then an FGFA-style window t .. t+15
        for i in [int(round(k * (n - 1) / 13)) for k in range(14)]:
            np.testing.assert_array_equal(src.get(i).image, seq[i])
        assert decodes[0] <= n   # one forward pass at most (seeks skip whole GOPs)
        decodes[0] = 0
        for t in range(n):
            for j in range(t, min(n, t + 16)):
                np.testing.assert_array_equal(src.get(j).image, seq[j])
        assert decodes[0] == n   # each frame decoded exactly once, the rest from the cache
        assert len(src._cache) <= 20
        # arbitrary jumps, backwards included
        for i in np.random.default_rng(0).integers(0, n, 30):
            np.testing.assert_array_equal(src.get(int(i)).image, seq[i])


def test_video_random_access_fallbacks(tmp_path, monkeypatch):
    n = 12
    path = _video(tmp_path / 'v.mp4', n, options={'g': 1})   # every frame a keyframe
    with open_source(path) as src:
        seq = [f.image for f in src]
        # a seek that lands after the wanted frame (a container seeking imprecisely) is detected
        # and the frame decoded from the start instead
        reopen = src._reopen
        monkeypatch.setattr(src, '_reopen', lambda pts, k: reopen(
            None if pts is None else int(src._index[0][min(k + 3, n - 1)]), k))
        for i in [5, 2, 9]:
            np.testing.assert_array_equal(src.get(i).image, seq[i])
        monkeypatch.undo()
        # a container without timestamps: frames counted from the start
        src.close()
        src._index = (None, None)
        for i in [7, 3, 4, 11, 0]:
            np.testing.assert_array_equal(src.get(i).image, seq[i])


def test_video_max_frames(tmp_path):
    with open_source(_video(tmp_path / 'v.mp4', 10), max_frames=4) as src:
        assert src.length == 4
        assert len(list(src)) == 4
        with pytest.raises(IndexError):
            src.get(4)


def test_live_source_reads_in_order_without_random_access(tmp_path):
    src = LiveSource(_video(tmp_path / 'v.mp4', 5))
    with src:
        assert src.is_live and src.length is None
        assert [f.index for f in src] == [0, 1, 2, 3, 4]
        with pytest.raises(VidDetError, match='is a live stream'):
            src.get(0)


# ---------------------------------------------------------------- prefetch thread
@pytest.mark.timeout(60)
def test_early_stop_does_not_hang_and_stops_the_thread(tmp_path):
    _folder(tmp_path, [str(i) for i in range(30)])
    src = open_source(str(tmp_path), prefetch=2)
    for frame in src:  # the thread fills its queue and blocks; break must release it
        time.sleep(0.2)
        break
    assert frame.index == 0
    assert _wait_no_decode_threads() == []
    # close() from a with-block while a generator is still referenced
    with open_source(str(tmp_path), prefetch=2) as src:
        it = iter(src)
        assert next(it).index == 0
    assert _wait_no_decode_threads() == []
    # a video source too
    with open_source(_video(tmp_path / 'v.mp4', 20), prefetch=1) as src:
        it = iter(src)
        next(it)
    assert _wait_no_decode_threads() == []


@pytest.mark.timeout(60)
def test_prefetch_thread_error_surfaces_after_earlier_frames(tmp_path, monkeypatch):
    _folder(tmp_path, [str(i) for i in range(6)])
    src = open_source(str(tmp_path))
    load = src._load

    def failing(i):
        if i == 3:
            raise RuntimeError('decoder exploded at 3')
        return load(i)
    monkeypatch.setattr(src, '_load', failing)
    got = []
    with pytest.raises(RuntimeError, match='decoder exploded at 3'):
        for f in src:
            got.append(f.index)
    assert got == [0, 1, 2]
    assert _wait_no_decode_threads() == []


# ---------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(VidDetError, match=r'nope\.mp4 does not exist'):
        open_source(str(tmp_path / 'nope.mp4'))


def test_empty_folder(tmp_path):
    (tmp_path / 'readme.txt').write_text('no frames here')
    with pytest.raises(VidDetError, match=rf'{tmp_path} contains no images'):
        open_source(str(tmp_path))


@pytest.mark.timeout(60)
def test_truncated_jpeg_raises_when_reached_with_file_and_index(tmp_path):
    _folder(tmp_path, [f'{i:06d}' for i in range(5)], ext='.JPEG')
    bad = tmp_path / '000002.JPEG'
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # OpenCV alone would return grey rows with a warning
    got = []
    with open_source(str(tmp_path)) as src:
        with pytest.raises(VidDetError, match=r'frame 2 \(.*000002\.JPEG\) is a truncated or corrupt JPEG'):
            for f in src:
                got.append(f.name)
        assert got == ['000000.JPEG', '000001.JPEG']
        with pytest.raises(VidDetError, match='000002.JPEG'):
            src.get(2)
        assert src.get(3).name == '000003.JPEG'


def test_garbage_png_is_named(tmp_path):
    _folder(tmp_path, ['0', '1'])
    (tmp_path / '1.png').write_bytes(b'\x89PNG but not really')
    with open_source(str(tmp_path)) as src:
        with pytest.raises(VidDetError, match=r'frame 1 \(.*1\.png\) is not an image OpenCV can decode'):
            list(src)


def test_text_file_as_video(tmp_path):
    p = tmp_path / 'clip.mp4'
    p.write_text('this is not a video\n' * 20)
    with pytest.raises(VidDetError, match=r'clip\.mp4 is not a video PyAV can decode'):
        open_source(str(p))


def test_single_image_instead_of_folder(tmp_path):
    cv2.imwrite(str(tmp_path / '000000.jpg'), _image(0))
    with pytest.raises(VidDetError, match='single image: give the folder'):
        open_source(str(tmp_path / '000000.jpg'))


@pytest.mark.parametrize('fmt', ['avi', 'mp4'])
def test_video_with_zero_frames(tmp_path, fmt):
    # AVI keeps an empty video stream; MP4 keeps no stream at all
    p = tmp_path / f'empty.{fmt}'
    c = av.open(str(p), mode='w', format=fmt)
    s = c.add_stream('mpeg4', rate=25)
    s.width, s.height, s.pix_fmt = 64, 48, 'yuv420p'
    c.start_encoding()
    c.close()
    with pytest.raises(VidDetError, match=rf'empty\.{fmt} contains no video frames'):
        open_source(str(p))


def test_missing_camera():
    with pytest.raises(VidDetError, match='camera device /dev/video97 does not exist'):
        open_source('97')
    with pytest.raises(VidDetError, match='camera device /dev/video98 does not exist'):
        open_source('/dev/video98')


def test_frame_is_a_plain_record():
    f = Frame(3, '000003.JPEG', np.zeros((2, 2, 3), np.uint8))
    assert (f.index, f.name, f.image.shape) == (3, '000003.JPEG', (2, 2, 3))
    index, name, image = f
    assert (index, name, image is f.image) == (3, '000003.JPEG', True)
