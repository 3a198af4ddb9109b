"""The streaming video engine: one loop that feeds frames to any method, offline or online.

A method (``viddet.methods``) sees one frame at a time plus a :class:`VideoContext` through which
it may look at other frames of the same video:

* ``offline`` (MMTracking's test protocol; default for files and folders): the method may read
  future frames — FGFA up to 15 ahead, SELSA its 14 references spread over the whole video (which
  needs the video length up front).
* ``online`` (causal; default for cameras and streams): the context refuses any frame after the
  current one, so results depend only on the past.

Memory is bounded by the methods' windows, not by the video length: the context keeps only the
preprocessed frames a method asked for within its look-ahead, and methods evict their own caches.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from viddet import VidDetError
from viddet.data.transforms import DEFAULT_SCALE, preprocess
from viddet.structures import Detections, ImageMeta

MODES = ('offline', 'online')


@dataclass
class VideoFrame:
    """A decoded and preprocessed frame.

    Attributes:
        index: 0-based frame index in the video.
        name: file name (frame folders) or ``%06d`` index.
        image: (H, W, 3) uint8 BGR original image (for drawing).
        img: (1, 3, Hp, Wp) float32 normalised, padded tensor on the model's device.
        meta: its :class:`ImageMeta`.
    """

    index: int
    name: str
    image: np.ndarray
    img: torch.Tensor
    meta: ImageMeta


class StageTimer:
    """Accumulates wall time per named stage (``backbone``, ``flow``, ``rpn``, ``roi_head``,
    ``aggregation``, ``nms``); a no-op unless enabled. Synchronises CUDA so GPU times are real."""

    def __init__(self, enabled: bool = False, device: Optional[torch.device] = None):
        self.enabled = enabled
        self.cuda = device is not None and torch.device(device).type == 'cuda'
        self.totals: Dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.totals[stage] += time.perf_counter() - t0

    def pop(self) -> Dict[str, float]:
        """Returns and resets the accumulated seconds per stage."""
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


class VideoContext:
    """What a method may know about the video around the current frame.

    Args:
        frames: iterator of (index, name, BGR image) in order.
        fetch: random access ``index -> (name, image)`` or None (live sources).
        length: number of frames, or None when unknown.
        mode: ``offline`` or ``online``.
        prepare: BGR image -> (tensor (3, Hp, Wp), ImageMeta).
        device: where tensors go.
        timer: a :class:`StageTimer` the method uses to report its stages.
    """

    def __init__(self, frames: Iterator[Tuple[int, str, np.ndarray]], fetch: Optional[Callable],
                 length: Optional[int], mode: str, prepare: Callable, device, timer: StageTimer):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self._frames = frames
        self._fetch = fetch
        self.length = length
        self.mode = mode
        self.prepare = prepare
        self.device = device
        self.timer = timer
        self.current = -1
        self._buffer: Dict[int, VideoFrame] = {}
        self._exhausted = False

    @property
    def last_index(self) -> Optional[int]:
        """Index of the video's last frame, when known (always known once the stream ended)."""
        return None if self.length is None else self.length - 1

    def _make(self, index: int, name: str, image: np.ndarray) -> VideoFrame:
        tensor, meta = self.prepare(image)
        return VideoFrame(index, name, image, tensor[None].to(self.device, non_blocking=True), meta)

    def _read_next(self) -> Optional[VideoFrame]:
        if self._exhausted:
            return None
        try:
            index, name, image = next(self._frames)
        except StopIteration:
            self._exhausted = True
            top = max(self._buffer, default=self.current)
            self.length = max(top, self.current) + 1
            return None
        frame = self._make(index, name, image)
        self._buffer[index] = frame
        return frame

    def advance(self) -> Optional[VideoFrame]:
        """Moves to the next frame (engine use); returns None at the end of the video."""
        self.current += 1
        self._buffer = {i: f for i, f in self._buffer.items() if i >= self.current}
        if self.current not in self._buffer and self._read_next() is None:
            return None
        return self._buffer[self.current]

    def frame(self, index: int) -> Optional[VideoFrame]:
        """Frame ``index``: the current one, a buffered future one (offline only), or None past the end.

        Future frames are read from the stream and kept until the engine reaches them, so a
        method looking k frames ahead costs k buffered frames, each decoded once.

        Raises:
            VidDetError: a future frame requested in online mode, or a past frame no longer buffered
                (use :meth:`fetch` for random access).
        """
        if index > self.current and self.mode == 'online':
            raise VidDetError(f'online mode: frame {index} was requested while at frame {self.current}')
        if index in self._buffer:
            return self._buffer[index]
        if index < self.current:
            raise VidDetError(f'frame {index} is no longer buffered (current {self.current}); use fetch()')
        while not self._exhausted and index not in self._buffer:
            self._read_next()
        return self._buffer.get(index)

    def fetch(self, index: int) -> VideoFrame:
        """Random access to any frame of the video (offline only; SELSA's references).

        Raises:
            VidDetError: online mode, or a source without random access.
        """
        if self.mode == 'online' and index > self.current:
            raise VidDetError(f'online mode: frame {index} was requested while at frame {self.current}')
        if index in self._buffer:
            return self._buffer[index]
        if self._fetch is None:
            raise VidDetError('this source has no random access (a live stream?): use --mode online')
        name, image = self._fetch(index)
        return self._make(index, name, image)


@dataclass
class FrameResult:
    """One frame's output: the frame (with its original image) and its detections
    (original-image pixels, on the CPU), plus the per-stage seconds spent on it when timed."""

    frame: VideoFrame
    detections: Detections
    stages: Dict[str, float]


def run_video(method, frames: Iterable[Tuple[int, str, np.ndarray]], *, mode: str = 'offline',
              length: Optional[int] = None, fetch: Optional[Callable] = None,
              device='cpu', scale: Tuple[int, int] = DEFAULT_SCALE,
              timer: Optional[StageTimer] = None) -> Iterator[FrameResult]:
    """Runs ``method`` over a video, yielding one :class:`FrameResult` per frame, in order.

    Args:
        method: a ``viddet.methods`` module (``reset()``, ``predict(frame, ctx)``).
        frames: (index, name, BGR uint8 image) tuples in order, index 0, 1, 2, ...
        mode: ``offline`` (may read future frames) or ``online`` (causal).
        length: number of frames when known (required by offline SELSA/TRoI unless ``fetch`` and
            the stream's end tell it).
        fetch: ``index -> (name, image)`` random access, for offline SELSA/TRoI references.
        device: torch device of ``method``.
        scale: resize limits (long, short) in pixels.
        timer: optional :class:`StageTimer` collecting per-stage times.
    """
    timer = timer or StageTimer(False)
    ctx = VideoContext(iter(frames), fetch, length, mode, lambda im: preprocess(im, scale), device, timer)
    method.reset()
    try:
        while True:
            # Inference mode is entered per frame, not around the loop: grad modes are thread-local,
            # so a ``with`` spanning the ``yield`` would stay active in the caller between frames.
            with torch.inference_mode():
                frame = ctx.advance()
                if frame is None:
                    break
                result = FrameResult(frame, method.predict(frame, ctx).to('cpu'), timer.pop())
            yield result
    finally:
        method.reset()
