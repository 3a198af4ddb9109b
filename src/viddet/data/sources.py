"""Frame sources: a folder of frames, a video file, or a live camera / network stream.

``open_source(spec)`` returns a :class:`FrameSource`. Every source

* iterates frames in order, ``for frame in source: ...``, each a :class:`Frame` with a (H, W, 3)
  uint8 BGR image. A background thread decodes up to ``prefetch`` frames ahead (bounded queue), so
  decoding overlaps the model; an error in that thread is raised in the consumer, after the frames
  before it were delivered. Stopping early (``break``, :meth:`FrameSource.close`, ``with``) stops
  the thread.
* offers random access, ``source.get(index)``, for offline methods that look at future frames
  (FGFA: up to 15 frames ahead; SELSA: 14 frames spread over the whole video). Decoded frames are
  kept in an LRU cache of ``cache_frames`` frames, so memory stays bounded for any video length:
  at most ``(cache_frames + prefetch) * H * W * 3`` bytes plus the decoder's own reference frames.

  - folder: each ``get`` decodes that one file (cost independent of the index).
  - video file: a second decoder, separate from the one that iterates, decodes forward from its
    current position; a jump backwards, or forwards past a keyframe, seeks to the last keyframe
    at or before the wanted frame (frames are identified by their presentation timestamps, read
    once from the container without decoding). Reading ``get(0), get(1), ...`` or a sliding
    window ``get(t + 15)`` decodes each frame once; each far jump (SELSA's spread references)
    costs at most one GOP of decoding. Frames equal those of sequential decoding bit for bit.
  - live camera / stream: no random access (:class:`viddet.VidDetError`); use online methods.

Folder ordering follows MMTracking's demo (``sorted(..., key=int(stem))``). MMTracking reads video
files with ``mmcv.VideoReader`` (OpenCV, approximate seeking); here PyAV decodes them, with exact
frame indices.

Folder frames are decoded by OpenCV from the file bytes (``cv2.imdecode(..., IMREAD_COLOR)``),
which is exactly MMTracking's loader (``mmcv.imfrombytes`` with the cv2 backend), so detections
match its test script bit for bit. Video frames come from PyAV, ``frame.to_ndarray(format='bgr24')``.
"""
from __future__ import annotations

import itertools
import os
import queue
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence

import av
import cv2
import numpy as np

from viddet.errors import VidDetError
from viddet.runtime import spare_cores

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
"""Image file suffixes of a frame folder (compared case-insensitively, so ``.JPEG`` counts)."""


class Frame(NamedTuple):
    """One decoded frame; a named tuple, so ``index, name, image = frame`` works too.

    Attributes:
        index: 0-based position in the source (after ordering), frames.
        name: the file name for folders (``000000.JPEG``), else the index as ``%06d``.
        image: (H, W, 3) uint8 array, BGR channel order, original pixels.
    """

    index: int
    name: str
    image: np.ndarray


class FrameSource:
    """An ordered sequence of frames; use :func:`open_source` to make one.

    Attributes:
        path: the spec it was opened from (folder, file, device or URL).
        fps: frames per second of a video or stream; None for a folder of frames.
        length: number of frames (after ``max_frames``); None when unknown (live streams).
        is_live: True for cameras and network streams (no random access, no known length).
        width, height: size of the first frame in pixels (None when a stream does not say).
    """

    path: str
    fps: Optional[float] = None
    length: Optional[int] = None
    is_live: bool = False
    width: Optional[int] = None
    height: Optional[int] = None

    def __init__(self, path: str, *, max_frames: Optional[int] = None, prefetch: Optional[int] = None,
                 cache_frames: int = 32):
        if max_frames is not None and max_frames < 0:
            raise ValueError(f'max_frames must be >= 0, got {max_frames}')
        if (prefetch is not None and prefetch < 0) or cache_frames < 1:
            raise ValueError('prefetch must be >= 0 and cache_frames >= 1')
        self.path = str(path)
        self.max_frames = max_frames
        self.prefetch = prefetch
        self.cache_frames = cache_frames
        self._cache: 'OrderedDict[int, Frame]' = OrderedDict()
        self._lock = threading.Lock()
        self._prefetchers: List[_Prefetcher] = []

    # ---------------------------------------------------------------- public API
    def __iter__(self) -> Iterator[Frame]:
        """Frames 0, 1, ... in order, decoded ``prefetch`` frames ahead by a background thread, or
        in the caller's thread when ``prefetch`` is 0. ``prefetch`` None (default): 4 when a core is
        left over by torch's threads (:func:`viddet.runtime.spare_cores`), else 0 — a decoder
        competing with torch for the cores slows every parallel op down far more than decoding
        in turn costs.

        Raises:
            VidDetError: when a frame cannot be decoded (names the file and frame index); the
                frames before it have been yielded.
        """
        depth = self.prefetch if self.prefetch is not None else (4 if spare_cores() else 0)
        if depth == 0:
            frames = self._frames()
            try:
                yield from (frames if self.max_frames is None else itertools.islice(frames, self.max_frames))
            finally:
                if hasattr(frames, 'close'):
                    frames.close()
            return
        pf = _Prefetcher(self._frames, self.max_frames, depth, f'viddet-decode {self.path}')
        self._prefetchers.append(pf)
        try:
            yield from pf
        finally:
            pf.close()
            self._prefetchers.remove(pf)

    def get(self, index: int) -> Frame:
        """Frame ``index`` (random access; see the module docstring for cost and memory).

        Thread-safe; independent of any running iteration. The last ``cache_frames`` frames read
        (and, for videos, decoded on the way) are cached.

        Raises:
            IndexError: index outside [0, length).
            VidDetError: live source (no random access), or the frame cannot be decoded.
        """
        if self.is_live:
            raise VidDetError(f'{self.path} is a live stream: frames can only be read in order, '
                              f'so offline methods (which read future frames) cannot run on it')
        if not 0 <= index < self.length:
            raise IndexError(f'frame index {index} is outside [0, {self.length}) of {self.path}')
        with self._lock:
            frame = self._cache.get(index)
            if frame is not None:
                self._cache.move_to_end(index)
                return frame
            return self._read(index)

    def close(self) -> None:
        """Stops every prefetch thread and releases decoders. Idempotent."""
        for pf in list(self._prefetchers):
            pf.close()
        with self._lock:
            self._cache.clear()
            self._close_random_access()

    def __enter__(self) -> 'FrameSource':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f'{type(self).__name__}({self.path!r}, length={self.length}, fps={self.fps}, '
                f'size={self.width}x{self.height})')

    # ---------------------------------------------------------------- for subclasses
    def _frames(self) -> Iterator[Frame]:
        """Sequential decode (runs in the prefetch thread)."""
        raise NotImplementedError

    def _read(self, index: int) -> Frame:
        """Random-access decode of a cache miss; called with the lock held; fills the cache."""
        raise NotImplementedError

    def _close_random_access(self) -> None:
        pass

    def _remember(self, frame: Frame) -> None:
        self._cache[frame.index] = frame
        self._cache.move_to_end(frame.index)
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)


# -------------------------------------------------------------------- folder of frames
def _frame_sort_key(names: List[str]):
    """Numeric order of stems when all are integers (MMTracking: ``int(name.split('.')[0])``)."""
    if all(Path(n).stem.isdigit() for n in names):
        return lambda n: (int(Path(n).stem), n)
    return lambda n: n


def _decode_image_file(path: Path, index: int) -> np.ndarray:
    """Decodes one frame file to (H, W, 3) uint8 BGR exactly as mmcv's cv2 backend does."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VidDetError(f'cannot read frame {index} ({path}): {e.strerror}') from None
    # libjpeg only *warns* about a truncated file and returns grey rows, so check the EOI marker.
    if path.suffix.lower() in ('.jpg', '.jpeg') and not data.rstrip(b'\0').endswith(b'\xff\xd9'):
        raise VidDetError(f'frame {index} ({path}) is a truncated or corrupt JPEG '
                          f'(no end-of-image marker)')
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise VidDetError(f'frame {index} ({path}) is not an image OpenCV can decode')
    return image


class ImageListSource(FrameSource):
    """An explicit, ordered list of frame image files (e.g. one video of a COCO-VID annotation file).

    Args:
        files: frame paths in playback order.
        path: a name for messages (default: the first file's folder).
    """

    def __init__(self, files, path: Optional[str] = None, **kwargs):
        files = [Path(f) for f in files]
        if not files:
            raise VidDetError(f'{path or "image list"} contains no frames')
        super().__init__(path or str(files[0].parent), **kwargs)
        first = _decode_image_file(files[0], 0)
        self.files = files[:self.max_frames]
        self.length = len(self.files)
        self.height, self.width = first.shape[:2]

    def _load(self, index: int) -> Frame:
        return Frame(index, self.files[index].name, _decode_image_file(self.files[index], index))

    def _frames(self) -> Iterator[Frame]:
        for i in range(self.length):
            yield self._load(i)

    def _read(self, index: int) -> Frame:
        frame = self._load(index)
        self._remember(frame)
        return frame


class FolderSource(ImageListSource):
    """A folder of frame images (``.jpg``, ``.jpeg``, ``.png`` in any case), e.g. ImageNet VID's
    ``000000.JPEG ...``. Ordered by integer stem when every stem is a number (so ``2.jpg`` comes
    before ``10.jpg``), else by name. Hidden files and other files are ignored."""

    def __init__(self, path: str, **kwargs):
        folder = Path(path)
        names = [p.name for p in folder.iterdir()
                 if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith('.') and p.is_file()]
        if not names:
            raise VidDetError(f'{path} contains no images ({", ".join(IMAGE_SUFFIXES)})')
        names.sort(key=_frame_sort_key(names))
        super().__init__([folder / n for n in names], path=path, **kwargs)


class ArraySource(FrameSource):
    """Frames already in memory: (H, W, 3) uint8 BGR arrays (Python API).

    A sequence (list, tuple) has a length and random access, so offline methods run on it; any other
    iterable (a generator, a camera loop) is consumed once, in order, like a live stream (online
    methods only, ``is_live`` True). Frame names are the indices as ``%06d``.

    Raises:
        VidDetError: an element that is not an (H, W, 3) uint8 array (when it is reached).
    """

    def __init__(self, frames, path: str = '<arrays>', **kwargs):
        super().__init__(path, **kwargs)
        if isinstance(frames, Sequence) and not isinstance(frames, (str, bytes)):
            self._items = list(frames)[:self.max_frames]
            self.length = len(self._items)
            self._iterable = None
        else:
            self._items = None
            self._iterable = iter(frames)
            self.is_live = True
            self.length = None

    @staticmethod
    def _check(index: int, image) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise VidDetError(f'frame {index}: expected an (H, W, 3) uint8 BGR array, got '
                              f'{image.dtype} of shape {image.shape}')
        return image

    def _frames(self) -> Iterator[Frame]:
        items = self._items if self._items is not None else self._iterable
        for i, image in enumerate(items):
            yield Frame(i, f'{i:06d}', self._check(i, image))

    def _read(self, index: int) -> Frame:
        frame = Frame(index, f'{index:06d}', self._check(index, self._items[index]))
        self._remember(frame)
        return frame


class LimitedSource(FrameSource):
    """The first ``max_frames`` frames of another source (which stays open; closing this one
    does not close it)."""

    def __init__(self, source: FrameSource, max_frames: int):
        super().__init__(source.path, max_frames=max_frames)
        self.source = source
        self.fps, self.is_live, self.width, self.height = source.fps, source.is_live, source.width, source.height
        self.length = max_frames if source.length is None else min(source.length, max_frames)
        if source.is_live:
            self.length = None

    def __iter__(self) -> Iterator[Frame]:
        return itertools.islice(iter(self.source), self.max_frames)

    def get(self, index: int) -> Frame:
        if self.length is not None and not 0 <= index < self.length:
            raise IndexError(f'frame index {index} is outside [0, {self.length}) of {self.path}')
        return self.source.get(index)


# -------------------------------------------------------------------- PyAV: files and streams
def _av_open(spec: str, what: str, **kwargs):
    try:
        return av.open(spec, **kwargs)
    except av.error.FFmpegError as e:
        reason = getattr(e, 'strerror', None) or str(e)
        raise VidDetError(f'{spec} is not {what} PyAV can decode ({reason})') from None


def _video_stream(container, spec: str):
    if not container.streams:
        container.close()
        raise VidDetError(f'{spec} contains no video frames (the container has no streams)')
    if not container.streams.video:
        container.close()
        raise VidDetError(f'{spec} has no video stream')
    return container.streams.video[0]


def _to_frame(av_frame, index: int) -> Frame:
    return Frame(index, f'{index:06d}', av_frame.to_ndarray(format='bgr24'))


def _decode_in_order(spec: str, what: str, failure: str, **open_kwargs) -> Iterator[Frame]:
    """Frames of the first video stream in presentation order (runs in the prefetch thread)."""
    container = _av_open(spec, what, **open_kwargs)
    try:
        stream = container.streams.video[0]
        # frame + slice threads; with prefetch 0 they run only while the caller waits for a frame
        stream.thread_type = 'AUTO'
        frames = container.decode(stream)
        index = 0
        while True:
            try:
                av_frame = next(frames, None)
            except av.error.FFmpegError as e:
                raise VidDetError(f'{spec}: {failure} {index}: {e}') from None
            if av_frame is None:
                return
            yield _to_frame(av_frame, index)
            index += 1
    finally:
        container.close()


class VideoFileSource(FrameSource):
    """A video file decoded with PyAV (any container/codec FFmpeg reads: MP4, MKV, AVI, ...).

    ``length`` is the container's frame count, or, when the container has none (MKV, TS), the
    number of video packets counted once at open. ``fps`` is the stream's average frame rate.
    """

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        container = _av_open(self.path, 'a video')
        try:
            stream = _video_stream(container, self.path)
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None
            n = stream.frames or None
            try:
                first = next(container.decode(stream), None)
            except av.error.FFmpegError as e:
                raise VidDetError(f'{self.path} is not a video PyAV can decode: frame 0: {e}') from None
            if first is None:
                raise VidDetError(f'{self.path} contains no video frames')
            self.width, self.height = first.width, first.height
        finally:
            container.close()
        if n is None:
            n = len(self._timestamps()[0])
        self.length = n if self.max_frames is None else min(n, self.max_frames)
        self._ra = None      # random-access decoder state: (container, stream, frame iterator)
        self._next = 0       # index of the next frame self._ra yields
        self._index = None   # (sorted pts of all frames, indices of keyframes) or None

    def _frames(self) -> Iterator[Frame]:
        return _decode_in_order(self.path, 'a video', 'cannot decode frame')

    # ---- random access
    def _timestamps(self):
        """(sorted pts of every frame, keyframe flags in that order) from one demux pass."""
        with _av_open(self.path, 'a video') as container:
            pts, key = [], []
            for packet in container.demux(container.streams.video[0]):
                if packet.size == 0:      # the demuxer's final flush packet
                    continue
                pts.append(packet.pts)
                key.append(packet.is_keyframe)
        if any(p is None for p in pts):
            return pts, None
        order = np.argsort(np.asarray(pts, np.int64), kind='stable')
        return np.asarray(pts, np.int64)[order], np.asarray(key, bool)[order]

    def _read(self, index: int) -> Frame:
        if self._index is None:
            pts, key = self._timestamps()
            self._index = (pts, np.flatnonzero(key)) if key is not None else (None, None)
        pts, keyframes = self._index
        if pts is None:  # no timestamps: count frames from the start, restart to go backwards
            if self._ra is None or index < self._next:
                self._reopen(None, 0)
        else:
            # seek to the last keyframe at or before index, unless decoding on from here is cheaper
            i = np.searchsorted(keyframes, index, side='right') - 1
            k = int(keyframes[i]) if i >= 0 else 0
            if self._ra is None or index < self._next or k > self._next:
                self._reopen(int(pts[k]), k)
        restarted = False
        while True:
            av_frame = self._decode_next()
            if pts is None:
                j = self._next
            else:
                j = int(np.searchsorted(pts, av_frame.pts)) if av_frame.pts is not None else -1
                if not 0 <= j < len(pts) or pts[j] != av_frame.pts:
                    raise VidDetError(f'{self.path}: decoded a frame with a timestamp ({av_frame.pts}) '
                                      f'the container does not list (damaged file?)')
                if j < self._next:    # leading frames of an open GOP, before the keyframe
                    continue
                if j > index:         # the seek landed after the wanted frame: decode from the start
                    if restarted:
                        raise VidDetError(f'{self.path}: frame {index} cannot be decoded')
                    self._reopen(None, 0)
                    restarted = True
                    continue
            self._next = j + 1
            frame = _to_frame(av_frame, j)
            self._remember(frame)
            if j == index:
                return frame

    def _decode_next(self):
        try:
            av_frame = next(self._ra[2], None)
        except av.error.FFmpegError as e:
            raise VidDetError(f'{self.path}: cannot decode frame {self._next}: {e}') from None
        if av_frame is None:
            raise VidDetError(f'{self.path} ended before frame {self._next} '
                              f'(the container announced {self.length} frames)')
        return av_frame

    def _reopen(self, seek_pts: Optional[int], first_index: int) -> None:
        """Positions the random-access decoder at keyframe ``first_index`` (pts ``seek_pts``)."""
        if self._ra is None:
            container = _av_open(self.path, 'a video')
            stream = container.streams.video[0]
            stream.thread_type = 'AUTO'
        else:
            container, stream, _ = self._ra
        if seek_pts is None or first_index == 0:
            container.seek(0)  # to the start (seek in av.time_base; flushes the decoder)
            first_index = 0
        else:
            container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
        self._ra = (container, stream, container.decode(stream))
        self._next = first_index

    def _close_random_access(self) -> None:
        if self._ra is not None:
            self._ra[0].close()
            self._ra = None


class LiveSource(FrameSource):
    """A camera (``/dev/video0``, or ``"0"`` for it) or a network stream (``rtsp://``, ``http(s)://``)
    read in order with PyAV. No random access; ``length`` is None unless ``max_frames`` is given.

    The prefetch queue is bounded: when the consumer is slower than the camera, the decoder waits
    and the device or server buffers (and eventually drops) frames.
    """

    is_live = True

    def __init__(self, path: str, *, timeout: float = 10.0, **kwargs):
        super().__init__(path, **kwargs)
        self.length = self.max_frames
        self._open_kwargs = {'timeout': timeout}
        if self.path.startswith('/dev/'):
            if not os.path.exists(self.path):
                raise VidDetError(f'camera device {self.path} does not exist')
            self._open_kwargs['format'] = 'v4l2'
        elif self.path.lower().startswith('rtsp://'):
            self._open_kwargs['options'] = {'rtsp_transport': 'tcp'}
        container = _av_open(self.path, 'a camera or stream', **self._open_kwargs)
        try:
            stream = _video_stream(container, self.path)
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None
            self.width, self.height = (stream.width or None), (stream.height or None)
        finally:
            container.close()

    def _frames(self) -> Iterator[Frame]:
        return _decode_in_order(self.path, 'a camera or stream', 'stream failed at frame',
                                **self._open_kwargs)


# -------------------------------------------------------------------- entry point
def open_source(spec: str, *, max_frames: Optional[int] = None, prefetch: Optional[int] = None,
                cache_frames: int = 32) -> FrameSource:
    """Opens a folder of frames, a video file, a camera or a network stream.

    Args:
        spec: a folder of ``.jpg/.jpeg/.png`` frames; a video file; a camera device
            (``/dev/video0``, or an integer such as ``"0"`` for ``/dev/video0``); or an
            ``rtsp://``, ``http://``, ``https://`` URL (treated as a live stream).
        max_frames: read only the first ``max_frames`` frames (None: all).
        prefetch: frames decoded ahead by a background thread during iteration (0: decode in the
            caller's thread; None: 4 when torch leaves a core spare, else 0).
        cache_frames: frames kept by :meth:`FrameSource.get` (LRU) for random access; each costs
            H * W * 3 bytes (6.2 MB at 1920x1080, so 32 frames are 200 MB).

    Returns:
        A :class:`FrameSource` (:class:`FolderSource`, :class:`VideoFileSource` or
        :class:`LiveSource`). The folder or file is checked (listed, first frame decoded) now.

    Raises:
        VidDetError: the path does not exist; a folder with no images; a single image instead
            of a folder; a file that is not a video PyAV can decode; a video with no frames;
            a camera or stream that cannot be opened.
    """
    spec = str(spec)
    kwargs = dict(max_frames=max_frames, prefetch=prefetch, cache_frames=cache_frames)
    if re.fullmatch(r'\d+', spec):
        return LiveSource(f'/dev/video{spec}', **kwargs)
    if re.match(r'(rtsp|rtsps|rtmp|http|https)://', spec, re.IGNORECASE) or spec.startswith('/dev/'):
        return LiveSource(spec, **kwargs)
    path = Path(spec)
    if not path.exists():
        raise VidDetError(f'{spec} does not exist')
    if path.is_dir():
        return FolderSource(spec, **kwargs)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise VidDetError(f'{spec} is a single image: give the folder that contains the frames')
    return VideoFileSource(spec, **kwargs)


# -------------------------------------------------------------------- prefetch thread
_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Prefetcher:
    """Runs ``make_frames()`` in a daemon thread, handing frames over through a bounded queue."""

    def __init__(self, make_frames: Callable[[], Iterator[Frame]], limit: Optional[int],
                 depth: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_frames, limit),
                                        name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, make_frames, limit) -> None:
        frames = None
        try:
            frames = make_frames()
            # islice stops *before* pulling frame `limit` (an endless camera iterable is not drained)
            for frame in (frames if limit is None else itertools.islice(frames, limit)):
                if not self._put(frame):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
            return
        finally:
            if frames is not None:
                frames.close()   # runs the generator's cleanup (closes the container) here
        self._put(_END)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or not self._thread.is_alive():
                    if self._queue.empty():
                        return
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
