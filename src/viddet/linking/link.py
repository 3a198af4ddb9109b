"""One entry point to link a whole video's detections: :func:`link_video` with a link mode of
:data:`LINK_MODES`.

* ``'seqnms'`` (:mod:`viddet.linking.seqnms`): rescored, suppressed boxes removed, ``track_ids`` = tube ids;
* ``'online'`` (:class:`~viddet.linking.tracker.IoUTracker` over the frames in order): every box kept,
  ``track_ids`` = track ids or -1;
* ``'none'``: unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from viddet.errors import VidDetError
from viddet.linking.seqnms import LINK_IOU, MIN_PATH_SCORE, RESCORING, SUPPRESS_IOU, seq_nms
from viddet.linking.tracker import IoUTracker
from viddet.structures import Detections, check_detections

LINK_MODES = ('seqnms', 'online', 'none')
"""The link modes of :func:`link_video`."""


def link_video(frames: Sequence[Detections], mode: str = 'seqnms', *, rescore: str = 'avg',
               link_iou: float = LINK_IOU, suppress_iou: float = SUPPRESS_IOU,
               min_path_score: float = MIN_PATH_SCORE, frame_nms_iou: Optional[float] = None,
               tracker: Optional[IoUTracker] = None,
               where: str = 'detections') -> List[Detections]:
    """Links one video's per-frame detections.

    Args:
        frames: the video's frames in order, one :class:`Detections` each (boxes in pixels).
        mode: ``'seqnms'`` — Seq-NMS (Han et al. 2016, arXiv:1602.08465; FGFA ``lib/nms/seq_nms.py``):
            returns per frame only the kept boxes (input order), scores rescored (``rescore``), and
            ``track_ids`` = tube ids (unique in the video; a kept box on no path is a tube of its own).
            ``'online'`` — :class:`IoUTracker` (``tracker``, or one with the defaults), reset, then fed
            the frames in order: every box kept unchanged, ``track_ids`` = track ids, -1 for untracked
            boxes. ``'none'`` — the frames unchanged (same objects).
        rescore: Seq-NMS rescoring, ``'avg'`` (default) | ``'max'`` | ``'none'``.
        link_iou, suppress_iou, min_path_score: Seq-NMS thresholds (0.5, 0.3, 0.01; see
            :mod:`viddet.linking.seqnms`).
        frame_nms_iou: Seq-NMS only: if given, a per-frame, per-class NMS (+1 convention, IoU > this
            suppressed) on the kept boxes afterwards, as FGFA's evaluation does with 0.3. Default None.
        tracker: the online tracker to use (its thresholds); it is reset first.
        where: name of the input (e.g. its file) for error messages.

    Returns:
        One :class:`Detections` per frame, on the device and with the dtypes of the input.

    Raises:
        VidDetError: unknown mode or rescoring, or malformed detections (the message names the frame).
    """
    if mode not in LINK_MODES:
        raise VidDetError(f'{where}: unknown link mode {mode!r}; expected one of {", ".join(LINK_MODES)}')
    if rescore not in RESCORING:
        raise VidDetError(f'{where}: unknown Seq-NMS rescoring {rescore!r}; expected one of {", ".join(RESCORING)}')
    for name, v in (('link_iou', link_iou), ('suppress_iou', suppress_iou)):
        if not 0.0 <= float(v) <= 1.0:
            raise VidDetError(f'{where}: Seq-NMS {name} must be in [0, 1], got {v}')
    if frame_nms_iou is not None and not 0.0 <= float(frame_nms_iou) <= 1.0:
        raise VidDetError(f'{where}: frame_nms_iou must be in [0, 1], got {frame_nms_iou}')
    if not float(min_path_score) > 0.0:
        raise VidDetError(f'{where}: Seq-NMS min_path_score must be > 0, got {min_path_score}')
    for i, d in enumerate(frames):
        check_detections(d, f'{where}: frame {i}')
    if mode == 'none':
        return list(frames)
    if mode == 'online':
        tracker = tracker if tracker is not None else IoUTracker()
        return tracker.track(frames)
    for i, d in enumerate(frames):
        if len(d) and bool((d.scores < 0).any()):
            raise VidDetError(f'{where}: frame {i}: Seq-NMS needs scores >= 0')
        if len(d) and bool(((d.boxes[:, 2] < d.boxes[:, 0]) | (d.boxes[:, 3] < d.boxes[:, 1])).any()):
            raise VidDetError(f'{where}: frame {i}: boxes need x2 >= x1 and y2 >= y1 for Seq-NMS')
    keep, scores, tubes = seq_nms([d.boxes.detach().cpu().double().numpy() for d in frames],
                                  [d.scores.detach().cpu().double().numpy() for d in frames],
                                  [d.labels.detach().cpu().numpy() for d in frames],
                                  rescore=rescore, link_iou=link_iou, suppress_iou=suppress_iou,
                                  min_path_score=min_path_score, frame_nms_iou=frame_nms_iou)
    out = []
    for d, k, s, t in zip(frames, keep, scores, tubes):
        idx = torch.as_tensor(k, device=d.boxes.device)
        out.append(Detections(d.boxes[idx], torch.as_tensor(s, dtype=d.scores.dtype, device=d.scores.device),
                              d.labels[idx], torch.as_tensor(t, dtype=torch.int64, device=d.boxes.device)))
    return out

