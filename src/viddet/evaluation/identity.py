"""Identity quality of linked detections against ground-truth tracks: ID switches, MOTA, IDF1.

* CLEAR MOT (Bernardin & Stiefelhagen, "Evaluating Multiple Object Tracking Performance: The CLEAR
  MOT Metrics", 2008, Sec. 2.1), matching per frame as the ``motmetrics`` package's
  ``MOTAccumulator.update`` does: a ground-truth object keeps the hypothesis it was last matched to
  if that hypothesis is present and still overlaps it (IoU >= ``iou_thr``); the remaining objects
  and hypotheses are matched by the Hungarian algorithm on ``1 - IoU`` among pairs with
  IoU >= ``iou_thr``. A match of an object to a hypothesis other than its last one is an **ID
  switch**. ``MOTA = 1 - (misses + false positives + ID switches) / ground-truth boxes``.
* IDF1 (Ristani et al., "Performance Measures and a Data Set for Multi-Target, Multi-Camera
  Tracking", 2016, Sec. 4): one-to-one matching of whole ground-truth tracks to whole hypothesis
  tracks (Hungarian) maximising the number of frames in which a matched pair overlaps with
  IoU >= ``iou_thr`` (IDTP); ``IDF1 = 2 IDTP / (ground-truth boxes + hypothesis boxes)``,
  ``IDP = IDTP / hypothesis boxes``, ``IDR = IDTP / ground-truth boxes``.

IoU has no +1 convention. With ``class_aware`` (default) only boxes of the same label can match.
Implemented here with numpy and scipy because ``motmetrics`` 1.4.0 (its latest release) fails with
numpy 2 (``np.asfarray``) and needs pandas.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from viddet.errors import VidDetError
from viddet.linking.tracker import box_iou
from viddet.structures import Detections


@dataclass
class IdentityMetrics:
    """Counts over one or more videos (add results with ``+``) and the derived scores.

    Attributes:
        num_gt: ground-truth boxes. num_pred: hypothesis boxes (with a track id, score >= min_score).
        matches: CLEAR MOT matches. misses: unmatched ground-truth boxes. false_positives: unmatched
        hypothesis boxes. id_switches: matches to another hypothesis than the object's last one.
        idtp: identity true positives (IDF1's matched-frame count).
    """

    num_gt: int = 0
    num_pred: int = 0
    matches: int = 0
    misses: int = 0
    false_positives: int = 0
    id_switches: int = 0
    idtp: int = 0

    def __add__(self, other: 'IdentityMetrics') -> 'IdentityMetrics':
        return IdentityMetrics(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def mota(self) -> float:
        """1 - (misses + false positives + ID switches) / ground-truth boxes (NaN without ground truth)."""
        return 1.0 - (self.misses + self.false_positives + self.id_switches) / self.num_gt if self.num_gt else float('nan')

    @property
    def idf1(self) -> float:
        """2 IDTP / (ground-truth boxes + hypothesis boxes) (NaN when both are 0)."""
        total = self.num_gt + self.num_pred
        return 2.0 * self.idtp / total if total else float('nan')

    @property
    def idp(self) -> float:
        return self.idtp / self.num_pred if self.num_pred else float('nan')

    @property
    def idr(self) -> float:
        return self.idtp / self.num_gt if self.num_gt else float('nan')

    def as_dict(self) -> dict:
        """The counts and mota, idf1, idp, idr as a plain dict."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(mota=self.mota, idf1=self.idf1, idp=self.idp, idr=self.idr)
        return d


def _frame_arrays(det: Detections, where: str, min_score=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(det, Detections):
        raise VidDetError(f'{where}: expected viddet.structures.Detections, got {type(det).__name__}')
    if det.track_ids is None:
        raise VidDetError(f'{where}: track_ids are missing (link the detections, or give the ground-truth ids)')
    boxes = det.boxes.detach().cpu().double().numpy().reshape(-1, 4)
    ids = det.track_ids.detach().cpu().numpy().astype(np.int64).reshape(-1)
    labels = det.labels.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if not len(boxes) == len(ids) == len(labels):
        raise VidDetError(f'{where}: boxes, labels and track_ids differ in length')
    keep = ids >= 0
    if min_score is not None:
        keep &= det.scores.detach().cpu().numpy().reshape(-1) >= min_score
    return boxes[keep], ids[keep], labels[keep]


def _valid_iou(gb, gl, pb, pl, iou_thr, class_aware) -> Tuple[np.ndarray, np.ndarray]:
    iou = box_iou(gb, pb) if len(gb) and len(pb) else np.zeros((len(gb), len(pb)))
    ok = iou >= iou_thr
    if class_aware:
        ok &= gl[:, None] == pl[None, :]
    return iou, ok


def identity_metrics(gt: Sequence[Detections], pred: Sequence[Detections], iou_thr: float = 0.5,
                     min_score: float = 0.0, class_aware: bool = True) -> IdentityMetrics:
    """ID switches, MOTA and IDF1 of one video's linked detections.

    Args:
        gt: per frame, the ground truth as :class:`Detections`: boxes (m, 4) in pixels, labels (m,),
            ``track_ids`` (m,) = instance ids (scores are ignored).
        pred: per frame (same number), the linked detections with ``track_ids``; boxes with id -1 or
            a score below ``min_score`` are left out.
        iou_thr: IoU from which a box matches an object (0.5).
        min_score: hypothesis boxes scoring below this are left out (e.g. the display threshold).
        class_aware: only same-label pairs match.

    Returns:
        :class:`IdentityMetrics`; for a data set add the videos' results:
        ``sum(results, IdentityMetrics())``.

    Raises:
        VidDetError: different numbers of frames, or frames without ``track_ids``.
    """
    if len(gt) != len(pred):
        raise VidDetError(f'identity_metrics: {len(gt)} ground-truth frames but {len(pred)} predicted frames')
    out = IdentityMetrics()
    last: Dict[int, int] = {}                 # gt id -> hypothesis id it was last matched to
    pair_frames: Dict[Tuple[int, int], int] = {}
    gt_count: Dict[int, int] = {}
    pred_count: Dict[int, int] = {}
    for t, (g, p) in enumerate(zip(gt, pred)):
        gb, gi, gl = _frame_arrays(g, f'identity_metrics: ground truth frame {t}')
        pb, pi, pl = _frame_arrays(p, f'identity_metrics: predictions frame {t}', min_score)
        if len(set(gi.tolist())) != len(gi) or len(set(pi.tolist())) != len(pi):
            raise VidDetError(f'identity_metrics: frame {t}: a track id appears twice in one frame')
        iou, ok = _valid_iou(gb, gl, pb, pl, iou_thr, class_aware)
        for o, h in zip(*np.nonzero(ok)):
            key = (int(gi[o]), int(pi[h]))
            pair_frames[key] = pair_frames.get(key, 0) + 1
        for x in gi.tolist():
            gt_count[x] = gt_count.get(x, 0) + 1
        for x in pi.tolist():
            pred_count[x] = pred_count.get(x, 0) + 1
        # CLEAR MOT: keep last frame's correspondences that are still valid, Hungarian for the rest
        col = {h: k for k, h in enumerate(pi.tolist())}
        g_used = np.zeros(len(gi), dtype=bool)
        p_used = np.zeros(len(pi), dtype=bool)
        n_match = 0
        for o, oid in enumerate(gi.tolist()):
            k = col.get(last.get(oid, -1))
            if k is not None and ok[o, k] and not p_used[k]:
                g_used[o] = p_used[k] = True
                n_match += 1
        rg, rp = np.flatnonzero(~g_used), np.flatnonzero(~p_used)
        if len(rg) and len(rp):
            sub_ok = ok[np.ix_(rg, rp)]
            cost = np.where(sub_ok, 1.0 - iou[np.ix_(rg, rp)], 1e6)
            for r, c in zip(*linear_sum_assignment(cost)):
                if not sub_ok[r, c]:
                    continue
                oid, hid = int(gi[rg[r]]), int(pi[rp[c]])
                if oid in last and last[oid] != hid:
                    out.id_switches += 1
                last[oid] = hid
                n_match += 1
        out.matches += n_match
        out.misses += len(gi) - n_match
        out.false_positives += len(pi) - n_match
        out.num_gt += len(gi)
        out.num_pred += len(pi)
    # IDF1: global one-to-one track assignment maximising the matched frames
    if pair_frames:
        gids = sorted(gt_count)
        pids = sorted(pred_count)
        gpos = {x: i for i, x in enumerate(gids)}
        ppos = {x: i for i, x in enumerate(pids)}
        w = np.zeros((len(gids), len(pids)))
        for (o, h), n in pair_frames.items():
            w[gpos[o], ppos[h]] = n
        r, c = linear_sum_assignment(-w)
        out.idtp = int(w[r, c].sum())
    return out

