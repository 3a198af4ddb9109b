"""Result writers: an annotated MP4 (:class:`VideoWriter`) and one JSON record per frame
(:class:`JsonLinesWriter`, read back with :func:`read_jsonl`).

Both write to ``<final name>.partial`` in the output folder and ``os.replace`` it onto the final
name in :meth:`close`, so the final name only ever holds a complete result. When the run fails
(an exception inside the ``with`` block, or :meth:`abort`):

* the MP4's temporary file is deleted (an unfinished MP4 has no index and does not play);
* the JSON lines stay in ``<final name>.partial``: every record is flushed as it is written, so
  that file holds every frame finished before the failure, even after a hard crash. The final
  name is not created, so a partial result is never mistaken for a complete one.
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
from viddet.errors import VidDetError
from viddet.structures import Detections


def _check_output(path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise VidDetError(f'output folder {path.parent} does not exist (for {path})')
    if path.is_dir():
        raise VidDetError(f'output {path} is a folder; give a file name')
    return path


def _partial_name(path: Path) -> Path:
    return path.with_name(path.name + '.partial')


class _AtomicOutput:
    """``with`` support for the writers: a clean exit calls ``close()`` (the file appears at its final
    path), an exception calls ``abort()`` (what was written is kept aside, never half-published)."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(_AtomicOutput):
    """Writes BGR frames to an MP4 (H.264 ``libx264`` when PyAV has it, else MPEG-4 Part 2;
    yuv420p), for ``viddet demo``'s annotated output.

    Usage::

        with VideoWriter('out.mp4', fps=source.fps) as w:
            for frame in source:
                w.write(draw_detections(frame.image, dets, VID_CLASSES))

    Args:
        path: the final ``.mp4`` path; its folder must exist.
        fps: frames per second (float or Fraction); None means 25. Fractions such as 30000/1001
            are kept exactly (a float is turned into the nearest fraction with denominator <= 1001).
        crf: libx264 quality (0 lossless .. 51 worst; 18-23 is visually good).
        options: extra FFmpeg encoder options, e.g. ``{'g': '12'}`` for a keyframe every 12 frames.

    The frame size is taken from the first frame. yuv420p needs even sizes, so an odd width or
    height is padded by one replicated column / row on the right / bottom.

    Raises:
        VidDetError: the output folder does not exist; a frame is not (H, W, 3) uint8 or has a
            different size than the first one.
    """

    def __init__(self, path, fps: Optional[float] = None, *, crf: int = 20,
                 options: Optional[dict] = None):
        self.path = _check_output(path)
        self.tmp_path = _partial_name(self.path)
        fps = 25.0 if fps is None else fps
        if not fps > 0:
            raise VidDetError(f'{self.path}: frames per second must be positive, got {fps}')
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.options = {str(k): str(v) for k, v in (options or {}).items()}
        self.frames_written = 0
        self.size = None        # (width, height) of the input frames
        self._container = None
        self._stream = None

    def _open(self, width: int, height: int) -> None:
        self.size = (width, height)
        self._container = av.open(str(self.tmp_path), mode='w', format='mp4',
                                  container_options={'movflags': '+faststart'})
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
        if self._container is None:
            self._open(w, h)
        elif (w, h) != self.size:
            raise VidDetError(f'{self.path}: frame {self.frames_written} is {w}x{h} but the video '
                              f'is {self.size[0]}x{self.size[1]}')
        if w % 2 or h % 2:
            image = cv2.copyMakeBorder(image, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format='bgr24')
        frame.pts = self.frames_written
        frame.time_base = 1 / self.fps
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flushes the encoder and renames the temporary file onto ``path``.

        Raises:
            VidDetError: no frame was written (an empty MP4 is not produced).
        """
        if self._container is None:
            if self.frames_written == 0:
                raise VidDetError(f'{self.path}: no frames were written, so no video was made')
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
        except BaseException:
            self.abort()
            raise
        self._container = None
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        """Stops writing and deletes the temporary file; ``path`` is not touched."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        self.tmp_path.unlink(missing_ok=True)


class JsonLinesWriter(_AtomicOutput):
    """Writes one JSON object per frame, one per line::

        {"frame": 0, "file": "000000.JPEG", "boxes": [[x1, y1, x2, y2], ...],
         "scores": [...], "labels": [...], "names": [...]}

    ``boxes`` are in original-image pixels rounded to ``box_decimals``; ``scores`` rounded to
    ``score_decimals``; ``labels`` are 0-based indices into ``class_names``, ``names`` the class
    names. Records are flushed to ``<path>.partial`` as they are written; :meth:`close` renames
    that onto ``path``. On failure the ``.partial`` file is kept with the frames so far (module
    docstring); ``partial_path`` names it.

    Raises:
        VidDetError: the output folder does not exist.
    """

    def __init__(self, path, class_names: Sequence[str] = VID_CLASSES, *, box_decimals: int = 2,
                 score_decimals: int = 4):
        self.path = _check_output(path)
        self.partial_path = _partial_name(self.path)
        self.class_names = tuple(class_names)
        self.box_decimals, self.score_decimals = box_decimals, score_decimals
        self.frames_written = 0
        self._file = open(self.partial_path, 'w', encoding='utf-8')

    def write(self, index: int, name: str, detections: Detections) -> None:
        """Appends the record of frame ``index`` (file name ``name``) and flushes it."""
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
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()
        self.frames_written += 1

    def close(self) -> None:
        """Renames the complete file onto ``path`` (after fsync)."""
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial_path, self.path)

    def abort(self) -> None:
        """Closes the file and leaves the records written so far in ``partial_path``."""
        if not self._file.closed:
            self._file.close()


_RECORD_KEYS = {'frame', 'boxes', 'scores', 'labels'}


def read_jsonl(path) -> List[dict]:
    """Reads the records written by :class:`JsonLinesWriter` (a ``.partial`` file too).

    Returns:
        One dict per line, keys ``frame, file, boxes, scores, labels, names`` as written.

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
