"""Result writers: an annotated MP4 (:class:`VideoWriter`) and one JSON record per frame
(:class:`JsonLinesWriter`, read back with :func:`read_jsonl`). Their output paths are checked with
:mod:`viddet.data.output_paths` (also usable on every output of a run before the work starts).

Partial results. Both writers write to ``<stem>.partial<suffix>`` beside the final name
(``out.partial.mp4``, ``out.partial.jsonl``) and rename it onto the final name only in
:meth:`~_PartialOutput.close`, when the result is complete; so the final name only ever holds a
complete result, and an earlier complete file there is never replaced by a partial one. When the
run stops early (an exception inside the ``with`` block, or :meth:`~_PartialOutput.abort`), what was
written is finished and kept under the partial name: the MP4 gets its index written (it plays,
with every frame written so far), the JSON lines are cut after the last complete record (every
record is written to the OS as it is made, so they survive a crash too). A partial file that holds
no frame, or that cannot be finished (a full disk), is removed. ``frames_written`` is the number of
frames the kept file holds; ``kept`` names it (None when nothing was kept), ``complete`` says
whether it is the final file.

Neither writer touches the disk before its first frame: an earlier partial file under the same
name stays until a new frame replaces it.

Write failures (a full disk, a lost network share) raise :class:`viddet.VidDetError` naming the
file and the reason.
"""
from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence

import av
import cv2
import numpy as np

from viddet.classes import VID_CLASSES
from viddet.data.output_paths import check_output_path, os_error_reason, partial_name
from viddet.errors import VidDetError
from viddet.structures import Detections


class _PartialOutput:
    """The partial-result mechanism both writers share (module docstring): ``write`` appends one
    frame to the partial file, :meth:`close` publishes it under the final name, :meth:`abort`
    keeps it as a partial result; ``with`` calls one of them.

    Subclasses implement ``_append(*args)`` (write one frame; may raise OSError), ``_finish()``
    (flush and close the partial file), and set ``_created`` when they make the partial file."""

    _created = False

    def __init__(self, path):
        self.path = check_output_path(path)
        self.partial_path = partial_name(self.path)
        self.frames_written = 0
        self.kept: Optional[Path] = None
        self.complete = False
        self._done = False

    def _write(self, *args) -> None:
        if self._done:
            raise VidDetError(f'{self.path}: already closed')
        try:
            self._append(*args)
        except OSError as e:
            raise VidDetError(f'cannot write {self.partial_path}: {os_error_reason(e)}') from None
        self.frames_written += 1

    def _remove_partial(self) -> None:
        if self._created:
            self.partial_path.unlink(missing_ok=True)

    def close(self) -> Path:
        """Finishes the file and renames it onto ``path`` (replacing an earlier file there).

        Raises:
            VidDetError: the file cannot be finished (nothing is kept) or renamed (the complete
                result is kept under ``partial_path``, as ``kept`` says).
        """
        if self._done:
            return self.kept
        self._done = True
        try:
            self._finish()
        except OSError as e:
            self._remove_partial()
            raise VidDetError(f'cannot finish {self.partial_path}: {os_error_reason(e)}; it was removed') from None
        except BaseException:
            self._remove_partial()
            raise
        try:
            os.replace(self.partial_path, self.path)
        except OSError as e:
            self.kept = self.partial_path
            raise VidDetError(f'cannot rename {self.partial_path} to {self.path} ({os_error_reason(e)}); the complete '
                              f'result is in {self.partial_path}') from None
        self.kept, self.complete = self.path, True
        return self.path

    def abort(self) -> Optional[Path]:
        """Stops writing and keeps the frames written so far in ``partial_path`` (finished, so the
        MP4 plays); ``path`` is never touched. Keeps nothing when no frame was written or the
        file cannot be finished.

        Returns:
            ``partial_path`` when it was kept, else None (also ``kept``).
        """
        if self._done:
            return self.kept
        self._done = True
        if not self._created:       # nothing written: an older partial file stays as it is
            return None
        try:
            self._finish()
        except (OSError, VidDetError):
            self._remove_partial()
            return None
        if self.frames_written == 0:
            self._remove_partial()
            return None
        self.kept = self.partial_path
        return self.kept

    def _append(self, *args) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(_PartialOutput):
    """Writes BGR frames to an MP4 (H.264 ``libx264`` when PyAV has it, else MPEG-4 Part 2;
    yuv420p), for ``viddet demo``'s annotated output; partial results as in the module docstring.

    Usage::

        with VideoWriter('out.mp4', fps=source.fps) as w:
            for frame in source:
                w.write(draw_detections(frame.image, dets, VID_CLASSES))

    Args:
        path: the final ``.mp4`` path; its folder must exist and be writable.
        fps: frames per second (float or Fraction); None means 25. Fractions such as 30000/1001
            are kept exactly (a float is turned into the nearest fraction with denominator <= 1001).
        crf: libx264 quality (0 lossless .. 51 worst; 18-23 is visually good).
        options: extra FFmpeg encoder options, e.g. ``{'g': '12'}`` for a keyframe every 12 frames.

    The frame size is taken from the first frame. yuv420p needs even sizes, so an odd width or
    height is padded by one replicated column / row on the right / bottom.

    Raises:
        VidDetError: an output path that cannot be written (:func:`check_output_path`); a frame
            that is not (H, W, 3) uint8 or has another size than the first one; a write failure.
    """

    def __init__(self, path, fps: Optional[float] = None, *, crf: int = 20,
                 options: Optional[dict] = None):
        super().__init__(path)
        fps = 25.0 if fps is None else fps
        if not (fps > 0 and np.isfinite(float(fps))):
            raise VidDetError(f'{self.path}: frames per second must be a positive number, got {fps}')
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.options = {str(k): str(v) for k, v in (options or {}).items()}
        self.size = None        # (width, height) of the input frames
        self._container = None
        self._stream = None

    def _open(self, width: int, height: int) -> None:
        self._container = av.open(str(self.partial_path), mode='w', format='mp4',
                                  container_options={'movflags': '+faststart'})
        self._created = True
        self.size = (width, height)
        if 'libx264' in av.codecs_available:
            options = {'crf': str(self.crf), 'preset': 'veryfast', **self.options}
            stream = self._container.add_stream('libx264', rate=self.fps, options=options)
        else:
            stream = self._container.add_stream('mpeg4', rate=self.fps, options=self.options)
            stream.bit_rate = int(0.3 * (width + width % 2) * (height + height % 2) * float(self.fps))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = 'yuv420p'
        self._stream = stream

    def write(self, image: np.ndarray) -> None:
        """Appends one (H, W, 3) uint8 BGR frame (the first frame fixes H and W)."""
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            raise VidDetError(f'{self.path}: frame {self.frames_written} must be an (H, W, 3) uint8 '
                              f'BGR array, got {getattr(image, "dtype", type(image))} '
                              f'{getattr(image, "shape", "")}')
        h, w = image.shape[:2]
        if self.size is not None and (w, h) != self.size:
            raise VidDetError(f'{self.path}: frame {self.frames_written} is {w}x{h} but the video '
                              f'is {self.size[0]}x{self.size[1]}')
        self._write(image)

    def _append(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        if self._container is None:
            self._open(w, h)
        if w % 2 or h % 2:
            image = cv2.copyMakeBorder(image, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format='bgr24')
        frame.pts = self.frames_written
        frame.time_base = 1 / self.fps
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def _finish(self) -> None:
        """Flushes the encoder and writes the MP4 index."""
        if self._container is None:
            raise VidDetError(f'{self.path}: no frames were written, so no video was made')
        container, self._container = self._container, None
        try:
            for packet in self._stream.encode():
                container.mux(packet)
        finally:
            container.close()


class JsonLinesWriter(_PartialOutput):
    """Writes one JSON object per frame, one per line::

        {"frame": 0, "file": "000000.JPEG", "boxes": [[x1, y1, x2, y2], ...],
         "scores": [...], "labels": [...], "names": [...]}

    plus ``"track_ids": [...]`` (-1: no track) when the detections were linked
    (:mod:`viddet.linking`). ``boxes`` are in original-image pixels rounded to ``box_decimals``;
    ``scores`` rounded to ``score_decimals``; ``labels`` are 0-based indices into
    ``class_names``, ``names`` the class names. Each record goes to the OS as it is written;
    partial results as in the module docstring.

    Raises:
        VidDetError: an output path that cannot be written (:func:`check_output_path`); a write
            failure.
    """

    def __init__(self, path, class_names: Sequence[str] = VID_CLASSES, *, box_decimals: int = 2,
                 score_decimals: int = 4):
        super().__init__(path)
        self.class_names = tuple(class_names)
        self.box_decimals, self.score_decimals = box_decimals, score_decimals
        self._fd = None
        self._size = 0          # bytes of the complete records written

    def write(self, index: int, name: str, detections: Detections) -> None:
        """Appends the record of frame ``index`` (file name ``name``)."""
        boxes = detections.boxes.detach().cpu().double().numpy().reshape(-1, 4)
        scores = detections.scores.detach().cpu().double().numpy().reshape(-1)
        labels = [int(v) for v in detections.labels.detach().cpu().reshape(-1).tolist()]
        record = {
            'frame': int(index),
            'file': str(name),
            'boxes': [[round(float(v), self.box_decimals) for v in box] for box in boxes],
            'scores': [round(float(v), self.score_decimals) for v in scores],
            'labels': labels,
            'names': [self.class_names[c] for c in labels],
        }
        if detections.track_ids is not None:
            record['track_ids'] = [int(v) for v in detections.track_ids.detach().cpu().reshape(-1).tolist()]
        self._write((json.dumps(record) + '\n').encode('utf-8'))

    def _open(self) -> None:
        self._fd = os.open(self.partial_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._created = True

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            self._open()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._size += len(data)

    def _finish(self) -> None:
        """Cuts the file after the last complete record, syncs and closes it."""
        if self._fd is None:
            self._open()
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, self._size)
            os.fsync(fd)
        finally:
            os.close(fd)


_RECORD_KEYS = {'frame', 'boxes', 'scores', 'labels'}


def read_jsonl(path) -> List[dict]:
    """Reads the records written by :class:`JsonLinesWriter` (a partial file too).

    Returns:
        One dict per line, keys ``frame, file, boxes, scores, labels, names`` (and ``track_ids``
        when linked) as written.

    Raises:
        VidDetError: the file does not exist, or a line is not a JSON object with those keys
            (names the file and line number).
    """
    path = Path(path)
    if not path.is_file():
        raise VidDetError(f'{path} does not exist')
    records = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise VidDetError(f'{path}, line {lineno}: not valid JSON ({e.msg})') from None
            if not isinstance(record, dict) or not _RECORD_KEYS <= set(record):
                raise VidDetError(f'{path}, line {lineno}: not a detection record '
                                  f'(needs the keys {", ".join(sorted(_RECORD_KEYS))})')
            records.append(record)
    return records
