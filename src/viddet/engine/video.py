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

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from viddet.data.frames import FrameSource
from viddet.data.transforms import DEFAULT_SCALE
from viddet.errors import VidDetError
from viddet.structures import Detections, ImageMeta
from viddet.timing import NO_TIMER, StageTimer

MODES = ('offline', 'online')


class TruncatedVideoWarning(UserWarning):
    """A video file held fewer frames than its container announced (the results cover the ones it
    held)."""


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


class VideoContext:
    """What a method may know about the video around the current frame.

    Args:
        source: the video (:class:`viddet.data.frames.FrameSource`): iterated in order, and read
            at random (``source.get``) for the frames a method wants that are no longer buffered
            (offline SELSA's references) unless it is live.
        mode: ``offline`` or ``online``.
        prepare: BGR image -> (tensor (3, Hp, Wp), ImageMeta).
        device: where tensors go.
        timer: a :class:`StageTimer` the method uses to report its stages.
    """

    def __init__(self, source: FrameSource, mode: str, prepare: Callable, device, timer: StageTimer,
                 strict_length: bool = False):
        if mode not in MODES:
            raise VidDetError(f'mode must be one of {", ".join(MODES)}, got {mode!r}')
        self.source = source
        self._frames = iter(source)
        self.length = source.length
        self.mode = mode
        self.prepare = prepare
        self.device = device
        self.timer = timer
        self.current = -1
        self._buffer: Dict[int, VideoFrame] = {}
        self._exhausted = False
        self.strict_length = strict_length

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
            read = max(self._buffer) + 1 if self._buffer else self.current   # frames 0 .. read - 1 exist
            if self.length is not None and read < self.length:
                self._stream_ended_early(read)
            self.length = read
            return None
        frame = self._make(index, name, image)
        self._buffer[index] = frame
        return frame

    def _stream_ended_early(self, read: int) -> None:
        msg = (f'{self.source.path}: the video ended after {read} frames, but its container announced '
               f'{self.length} (a truncated or damaged file?)')
        if self.strict_length:
            raise VidDetError(msg)
        warnings.warn(msg, TruncatedVideoWarning, stacklevel=2)

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
        if self.source.is_live:
            raise VidDetError(f'{self.source.path} has no random access (a live stream): use --mode online')
        frame = self.source.get(index)
        return self._make(index, frame.name, frame.image)


@dataclass
class FrameResult:
    """One frame's output: the frame (with its original image) and its detections
    (original-image pixels, on the CPU), plus the per-stage seconds spent on it when timed."""

    frame: VideoFrame
    detections: Detections
    stages: Dict[str, float]


def run_video(method, source: FrameSource, *, mode: str = 'offline', device='cpu',
              scale: Tuple[int, int] = DEFAULT_SCALE, timer: StageTimer = NO_TIMER,
              strict_length: bool = False) -> Iterator[FrameResult]:
    """Runs ``method`` over a video, yielding one :class:`FrameResult` per frame, in order.

    Args:
        method: a :class:`viddet.methods.VIDMethod` (``reset()``, ``predict(frame, ctx)``).
        source: the frames (:class:`viddet.data.frames.FrameSource`: a file, a folder, a stream,
            or :class:`viddet.data.image_sources.ArraySource` for arrays in memory).
        mode: ``offline`` (may read future frames; needs a source with random access and a known
            length for SELSA/TRoI) or ``online`` (causal).
        device: torch device of ``method``.
        scale: resize limits (long, short) in pixels.
        timer: a :class:`viddet.timing.StageTimer` collecting per-stage times.
        strict_length: a video that ends before the frame count its container announced is an
            error (``viddet test``); otherwise a :class:`TruncatedVideoWarning` naming both numbers.

    Raises:
        VidDetError: offline mode on a live source; bad frames (from the source); a truncated
            video with ``strict_length``.
    """
    if mode == 'offline' and source.is_live:
        raise VidDetError(f'{source.path} is a live source: offline mode needs future frames; use --mode online')
    ctx = VideoContext(source, mode, lambda im: method.prepare(im, scale), device, timer, strict_length)
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
