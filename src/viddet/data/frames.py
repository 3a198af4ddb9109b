"""The frame-source interface: :class:`Frame` and :class:`FrameSource` (what every source offers),
and :class:`LimitedSource` (the first frames of another source).

A :class:`FrameSource`

* iterates frames in order, ``for frame in source: ...``, each a :class:`Frame` with a (H, W, 3)
  uint8 BGR image. A background thread (:class:`viddet.data.prefetch.Prefetcher`) decodes up to
  ``prefetch`` frames ahead (bounded queue), so decoding overlaps the model; an error in that thread
  is raised in the consumer, after the frames before it were delivered. Stopping early (``break``,
  :meth:`FrameSource.close`, ``with``) stops the thread.
* offers random access, ``source.get(index)``, for offline methods that look at future frames
  (FGFA: up to 15 frames ahead; SELSA: 14 frames spread over the whole video). Decoded frames are
  kept in an LRU cache of ``cache_frames`` frames, so memory stays bounded for any video length:
  at most ``(cache_frames + prefetch) * H * W * 3`` bytes plus the decoder's own reference frames.
  How a cache miss is decoded is the subclass's: see :mod:`viddet.data.sources` for each kind.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Iterator, List, NamedTuple, Optional

import numpy as np

from viddet.data.prefetch import Prefetcher
from viddet.errors import VidDetError
from viddet.runtime import spare_cores


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
    """An ordered sequence of frames; use :func:`viddet.data.sources.open_source` to make one.

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
        self._prefetchers: List[Prefetcher] = []

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
        pf = Prefetcher(self._frames, self.max_frames, depth, f'viddet-decode {self.path}')
        self._prefetchers.append(pf)
        try:
            yield from pf
        finally:
            pf.close()
            self._prefetchers.remove(pf)

    def get(self, index: int) -> Frame:
        """Frame ``index`` (random access; see the module docstrings here and of
        :mod:`viddet.data.sources` for cost and memory).

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
