"""Frame sources decoded with PyAV: video files (:class:`VideoFileSource`) and cameras or network
streams (:class:`LiveSource`).

MMTracking reads video files with ``mmcv.VideoReader`` (OpenCV, approximate seeking); here PyAV
decodes them, with exact frame indices, ``frame.to_ndarray(format='bgr24')``.

Random access in a video file: a second decoder, separate from the one that iterates, decodes
forward from its current position; a jump backwards, or forwards past a keyframe, seeks to the last
keyframe at or before the wanted frame (frames are identified by their presentation timestamps,
read once from the container without decoding). Reading ``get(0), get(1), ...`` or a sliding window
``get(t + 15)`` decodes each frame once; each far jump (SELSA's spread references) costs at most one
GOP of decoding. Frames equal those of sequential decoding bit for bit. Live sources have no random
access (:class:`viddet.VidDetError`); use online methods on them.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import av
import numpy as np

from viddet.data.frames import Frame, FrameSource
from viddet.errors import VidDetError


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
