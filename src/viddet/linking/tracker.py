"""Online (causal) linking: an IoU tracker that gives each detection a track id as frames arrive.

It follows SORT (Bewley et al., "Simple Online and Realtime Tracking", ICIP 2016, Sec. 3.3-3.4):
per frame, the detections are assigned to the live tracks by the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) on the cost ``1 - IoU``, pairs below ``match_iou`` are
rejected, unmatched confident detections start tracks, and tracks unmatched for too long end. As in
SORT's IoU association there is no appearance model; unlike SORT the motion model is optional and
is a plain constant velocity instead of a Kalman filter, and tracks are reported from their first
frame (no ``min_hits`` probation, so that no id is ever revised).

Rules, per class (a detection only continues a track of its own label):

* Detections scoring ``< match_score`` are ignored (track id -1).
* A track's predicted box is its last matched box, or with ``motion=True`` that box moved by the
  track's velocity (mean per-frame displacement of (x1, y1, x2, y2) over its last two matches)
  times the frames since.
* Detections and live tracks are matched by the Hungarian algorithm on ``1 - IoU`` (IoU of the
  predicted box and the detection, no +1 convention); a pair is accepted only if IoU >= ``match_iou``.
* An unmatched detection scoring ``>= start_score`` starts a new track; other unmatched
  detections get -1.
* A track unmatched in more than ``max_missed`` consecutive frames ends and is dropped (memory is
  bounded by the live tracks).

Track ids are integers 0, 1, 2, ... in order of creation (within a frame, new tracks in the order of
the detections). The tracker sees frame t only when :meth:`IoUTracker.update` is called with it, so
the ids of frames 0..t never depend on later frames; :meth:`IoUTracker.reset` returns it to the
initial state (ids restart at 0), so replaying the same frames gives the same ids.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from viddet.errors import VidDetError
from viddet.structures import Detections, check_detections

START_SCORE = 0.5
"""An unmatched detection scoring at least this starts a new track (the CLI's default --score-thr)."""
MATCH_SCORE = 0.1
"""Detections scoring below this take no part in tracking (track id -1)."""
MATCH_IOU = 0.3
"""Smallest IoU between a track's predicted box and a detection for a match (SORT's ``iou_threshold``)."""
MAX_MISSED = 5
"""A track unmatched in more than this many consecutive frames ends."""

_REJECT = 1e6  # cost of a pair below match_iou: taken only when nothing else is left, then rejected


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (n, 4) and (m, 4) (x1, y1, x2, y2) boxes in pixels (no +1): (n, m) float64."""
    b1 = np.asarray(boxes1, dtype=np.float64)[:, None, :]
    b2 = np.asarray(boxes2, dtype=np.float64)[None, :, :]
    w = np.clip(np.minimum(b1[..., 2], b2[..., 2]) - np.maximum(b1[..., 0], b2[..., 0]), 0, None)
    h = np.clip(np.minimum(b1[..., 3], b2[..., 3]) - np.maximum(b1[..., 1], b2[..., 1]), 0, None)
    inter = w * h
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    union = area1 + area2 - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class _Track:
    id: int
    label: int
    box: np.ndarray            # (4,) last matched box, pixels
    frame: int                 # frame index of the last match
    velocity: np.ndarray       # (4,) pixels per frame
    missed: int = 0


class IoUTracker:
    """Causal IoU tracker (SORT-style Hungarian association); the streaming form of ``--mode online``.

    Args:
        start_score: an unmatched detection scoring >= this starts a track (default 0.5).
        match_score: detections scoring < this are not tracked (default 0.1).
        match_iou: minimum IoU of a match (default 0.3).
        max_missed: frames a track may stay unmatched before it ends (default 5).
        motion: predict with a constant velocity (default False: the last box).

    Raises:
        VidDetError: a threshold out of range.
    """

    def __init__(self, start_score: float = START_SCORE, match_score: float = MATCH_SCORE,
                 match_iou: float = MATCH_IOU, max_missed: int = MAX_MISSED, motion: bool = False):

        for name, v in (('start_score', start_score), ('match_score', match_score), ('match_iou', match_iou)):
            if not 0.0 <= float(v) <= 1.0:
                raise VidDetError(f'IoUTracker: {name} must be in [0, 1], got {v}')
        if int(max_missed) != max_missed or max_missed < 0:
            raise VidDetError(f'IoUTracker: max_missed must be an integer >= 0, got {max_missed}')
        self.start_score = float(start_score)
        self.match_score = float(match_score)
        self.match_iou = float(match_iou)
        self.max_missed = int(max_missed)
        self.motion = bool(motion)
        self.reset()

    def reset(self) -> None:
        """Forgets every track; the next :meth:`update` is frame 0 and the next new id is 0."""
        self.tracks: List[_Track] = []
        self.frame = 0
        self.next_id = 0

    def _predict(self, tr: _Track) -> np.ndarray:
        if self.motion:
            return tr.box + tr.velocity * (self.frame - tr.frame)
        return tr.box

    def step(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Processes one frame given as arrays: (n, 4) boxes in pixels, (n,) scores, (n,) labels.

        Returns:
            (n,) int64 track ids (-1: not tracked).
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        ids = np.full(len(scores), -1, dtype=np.int64)
        eligible = scores >= self.match_score
        matched_tracks = set()
        for c in sorted(set(labels[eligible].tolist()) | {t.label for t in self.tracks}):
            dets = np.flatnonzero(eligible & (labels == c))
            trs = [i for i, t in enumerate(self.tracks) if t.label == c]
            if len(dets) == 0 or not trs:
                continue
            pred = np.stack([self._predict(self.tracks[i]) for i in trs])
            iou = box_iou(pred, boxes[dets])
            cost = np.where(iou >= self.match_iou, 1.0 - iou, _REJECT)
            rows, cols = linear_sum_assignment(cost)
            for r, k in zip(rows.tolist(), cols.tolist()):
                if iou[r, k] < self.match_iou:
                    continue
                tr = self.tracks[trs[r]]
                d = dets[k]
                dt = self.frame - tr.frame
                tr.velocity = (boxes[d] - tr.box) / dt
                tr.box = boxes[d].copy()
                tr.frame = self.frame
                tr.missed = 0
                ids[d] = tr.id
                matched_tracks.add(trs[r])
        alive = []
        for i, tr in enumerate(self.tracks):
            if i not in matched_tracks:
                tr.missed += 1
            if tr.missed <= self.max_missed:
                alive.append(tr)
        for d in np.flatnonzero((ids < 0) & (scores >= self.start_score) & eligible).tolist():
            alive.append(_Track(self.next_id, int(labels[d]), boxes[d].copy(), self.frame, np.zeros(4)))
            ids[d] = self.next_id
            self.next_id += 1
        self.tracks = alive
        self.frame += 1
        return ids

    def update(self, detections: Detections) -> Detections:
        """Processes the next frame: the same detections with ``track_ids`` ((n,) int64, -1: none).

        Raises:
            VidDetError: detections of the wrong type or shape.
        """
        check_detections(detections, f'frame {self.frame}')
        ids = self.step(detections.boxes.detach().cpu().numpy(), detections.scores.detach().cpu().numpy(),
                        detections.labels.detach().cpu().numpy())
        return replace(detections, track_ids=torch.as_tensor(ids, device=detections.boxes.device))

    def track(self, frames) -> List[Detections]:
        """:meth:`reset`, then :meth:`update` on every frame of a video, in order."""
        self.reset()
        return [self.update(d) for d in frames]

    @property
    def num_live(self) -> int:
        """Number of live tracks (bounded memory: ended tracks are dropped)."""
        return len(self.tracks)

    def live_ids(self) -> List[int]:
        """Ids of the live tracks, in creation order."""
        return [t.id for t in self.tracks]
