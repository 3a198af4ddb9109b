"""Official ImageNet VID mAP and its motion breakdown (slow / medium / fast): matching and AP.

Semantics follow the ILSVRC2015 devkit (``evaluation/eval_vid_detection.m``) as re-written in Python
by FGFA (msracver/Flow-Guided-Feature-Aggregation ``lib/dataset/imagenet_vid_eval.py`` ``vid_eval``
and ``lib/dataset/imagenet_vid_eval_motion.py`` ``vid_eval_motion``), re-implemented vectorised
with numpy:

* IoU with the +1 pixel convention and the per-object threshold ``min(0.5, w h / ((w + 10)(h + 10)))``
  (small objects are matched with a relaxed IoU): :mod:`viddet.evaluation.iou`.
* matching per image, detections in descending score order: each takes the not yet detected
  ground-truth object of its class with the largest IoU among those with ``IoU >= thr``
  (first object in annotation order on ties); TP if found, else FP.
* AP per class: all detections of the class over the data set in descending score order,
  cumulative TP/FP, recall = TP / npos, precision = TP / max(TP + FP, eps), VOC all-points AP
  (monotone precision envelope, sum of recall steps x precision); mAP = mean over classes.
* motion bins (:data:`viddet.evaluation.motion.MOTION_RANGES`): per bin, objects outside the bin
  are ignored: a detection matched to an ignored object is neither TP nor FP; an unmatched
  detection is a full FP if it overlaps a non-ignored object more than any ignored one, not an FP
  if the reverse, ``empty_weight`` (share of all motion-IoU values inside the bin) if its frame has
  no ground truth, and otherwise (a tie) the fraction of the frame's objects that are ignored;
  npos counts only non-ignored objects; classes without objects in the bin are left out of the
  mean. The (inactive) area range ``[0, 1e10]`` of the original is kept, including its effect on
  boxes of negative area.

Deliberate, documented differences to the original scripts:

* **Ties in score** are broken by frame order, then by the order of the input (the original uses
  numpy's non-stable quicksort, whose tie order is unspecified). Scores are quantised like the
  devkit's text file (``%.4f``, boxes ``%.2f``) unless ``devkit_rounding=False``.
* **Classes without ground truth** are left out of the plain mAP as they are in the motion mAP
  (the original plain script averages all 30 classes and yields 0 or NaN for such a class; on
  the full ImageNet VID val set every class has objects, so the numbers are identical).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from viddet.errors import VidDetError
from viddet.evaluation.io import DetectionArrays, GroundTruth, devkit_round
from viddet.evaluation.iou import area_plus1, iou_plus1
from viddet.evaluation.motion import MOTION_RANGES, MotionIoU

AREA_RANGE = (0.0, 1e5 * 1e5)
"""The single ``area_ranges`` entry FGFA evaluates with (``do_python_eval_gen``), square pixels."""
_EPS = np.finfo(np.float64).eps


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC all-points AP: area under the monotone (non-increasing) precision envelope.

    Args:
        rec, prec: (n,) cumulative recall and precision in descending score order.
    """
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@dataclass
class _Pairs:
    """All (detection, ground-truth object) pairs of the same frame, detection-major."""

    det: np.ndarray
    gt: np.ndarray
    iou: np.ndarray
    overlap: np.ndarray
    det_start: np.ndarray  # (n_det,) first pair of each detection
    det_count: np.ndarray  # (n_det,) pairs of each detection (= objects in its frame)


def _make_pairs(gt: GroundTruth, det: DetectionArrays) -> _Pairs:
    n_img = len(gt.image_ids)
    gt_count = np.bincount(gt.img_index, minlength=n_img)
    gt_start = np.concatenate(([0], np.cumsum(gt_count)[:-1])) if n_img else np.zeros(0, np.int64)
    cnt = gt_count[det.img_index] if len(det) else np.zeros(0, np.int64)
    total = int(cnt.sum())
    pd = np.repeat(np.arange(len(det)), cnt)
    first = np.concatenate(([0], np.cumsum(cnt)[:-1])) if len(det) else np.zeros(0, np.int64)
    within = np.arange(total) - np.repeat(first, cnt)
    pg = np.repeat(gt_start[det.img_index], cnt) + within
    iou, ok = iou_plus1(det.boxes[pd], gt.boxes[pg])
    return _Pairs(det=pd, gt=pg, iou=iou, overlap=ok, det_start=first, det_count=cnt)


def _greedy_match(det: DetectionArrays, rank_key: np.ndarray, pairs: _Pairs, cand: np.ndarray, n_gt: int) -> np.ndarray:
    """Devkit greedy matching, vectorised over frames and classes.

    Within each (frame, class) group detections are processed in ``rank_key`` order (ascending);
    each takes the undetected candidate object with the largest IoU (lowest object index on ties).
    Groups are independent, so the k-th detection of every group is handled in one numpy step.

    Returns:
        (n_det,) int64 matched object index, -1 when unmatched.
    """
    match = np.full(len(det), -1, np.int64)
    cd, cg, co = pairs.det[cand], pairs.gt[cand], pairs.iou[cand]
    if len(cd) == 0:
        return match
    # rank of each candidate-holding detection within its (frame, class) group
    dets = np.unique(cd)
    g_img, g_lab, g_key = det.img_index[dets], det.labels[dets], rank_key[dets]
    o = np.lexsort((g_key, g_lab, g_img))
    dets, g_img, g_lab = dets[o], g_img[o], g_lab[o]
    new_group = np.ones(len(dets), bool)
    new_group[1:] = (g_img[1:] != g_img[:-1]) | (g_lab[1:] != g_lab[:-1])
    gstart = np.maximum.accumulate(np.where(new_group, np.arange(len(dets)), 0))
    rank = np.empty(len(det), np.int64)
    rank[dets] = np.arange(len(dets)) - gstart
    # candidate pairs ordered by (rank, det, -iou, gt): each round is a contiguous slice
    pr = rank[cd]
    o = np.lexsort((cg, -co, cd, pr))
    cd, cg, pr = cd[o], cg[o], pr[o]
    bounds = np.searchsorted(pr, np.arange(int(pr.max()) + 2))
    detected = np.zeros(n_gt, bool)
    for r in range(len(bounds) - 1):
        s, e = bounds[r], bounds[r + 1]
        d_r, g_r = cd[s:e], cg[s:e]
        free = ~detected[g_r]
        d_r, g_r = d_r[free], g_r[free]
        if len(d_r) == 0:
            continue
        first = np.ones(len(d_r), bool)
        first[1:] = d_r[1:] != d_r[:-1]
        match[d_r[first]] = g_r[first]
        detected[g_r[first]] = True
    return match


@dataclass
class ClassCurves:
    """Per-class precision/recall of one metric: ``rec[k]``, ``prec[k]`` arrays (None: no objects)."""

    ap: np.ndarray              # (C,) AP per class, NaN where npos == 0
    npos: np.ndarray            # (C,) objects counted per class (fractional never; ints as float)
    rec: List[Optional[np.ndarray]] = field(default_factory=list)
    prec: List[Optional[np.ndarray]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        """Mean AP over classes with npos > 0 (NaN if none)."""
        v = self.ap[self.npos > 0]
        return float(v.mean()) if len(v) else float('nan')


def _accumulate(det: DetectionArrays, global_order: np.ndarray, tp: np.ndarray, fp: np.ndarray,
                npos: np.ndarray, num_classes: int, keep_curves: bool) -> ClassCurves:
    lab = det.labels[global_order]
    tp, fp = tp[global_order], fp[global_order]
    by_class = np.argsort(lab, kind='stable')
    bounds = np.searchsorted(lab[by_class], np.arange(num_classes + 1))
    ap = np.full(num_classes, np.nan)
    curves = ClassCurves(ap=ap, npos=npos.astype(np.float64))
    for c in range(num_classes):
        idx = by_class[bounds[c]:bounds[c + 1]]
        if npos[c] <= 0:
            curves.rec.append(None)
            curves.prec.append(None)
            continue
        ctp, cfp = np.cumsum(tp[idx]), np.cumsum(fp[idx])
        rec = ctp / float(npos[c])
        prec = ctp / np.maximum(ctp + cfp, _EPS)
        ap[c] = voc_ap(rec, prec)
        curves.rec.append(rec if keep_curves else None)
        curves.prec.append(prec if keep_curves else None)
    return curves


@dataclass
class VidEvalResult:
    """Output of :func:`vid_eval`.

    Attributes:
        plain: the official mAP curves (FGFA ``imagenet_vid_eval.py`` ``vid_eval``).
        motion: 'all', 'fast', 'medium', 'slow' -> curves of FGFA ``imagenet_vid_eval_motion.py``
            ``vid_eval_motion``
            (empty when motion IoU was not evaluated).
        motion_source: where the motion IoU came from.
        class_names: class names in label order.
    """

    plain: ClassCurves
    motion: Dict[str, ClassCurves]
    motion_source: str
    class_names: List[str]

    @property
    def map(self) -> float:
        return self.plain.mean

    def motion_map(self, name: str) -> float:
        return self.motion[name].mean if name in self.motion else float('nan')


def vid_eval(gt: GroundTruth, det: DetectionArrays, motion: Optional[MotionIoU] = None,
             devkit_rounding: bool = True, keep_curves: bool = True) -> VidEvalResult:
    """Official ImageNet VID mAP and (if ``motion`` is given) the FGFA motion-binned mAPs.

    Args:
        gt: ground truth (:func:`viddet.evaluation.io.load_ground_truth`).
        det: detections (:func:`viddet.evaluation.io.results_to_arrays`), original-image pixels.
        motion: per-object motion IoU (:func:`viddet.evaluation.motion.motion_iou_from_mat` /
            :func:`viddet.evaluation.motion.compute_motion_iou`).
        devkit_rounding: quantise scores to 4 and boxes to 2 decimals like the devkit's text file.
        keep_curves: keep per-class precision/recall arrays (for PR plots).

    Returns:
        :class:`VidEvalResult` (APs are fractions in [0, 1]).

    Complexity: O(P log P) for the P (detection, object) pairs of the same frames, plus one numpy
    step per detection rank within a (frame, class) group.
    """
    if devkit_rounding and len(det):
        det = DetectionArrays(det.img_index, det.labels, devkit_round(det.scores, 4), devkit_round(det.boxes, 2))
    n_det, n_gt, C = len(det), len(gt.labels), gt.num_classes
    idx = np.arange(n_det)
    # per-frame order: descending score, ties by input order; global order: score, then frame, then that
    global_order = np.lexsort((idx, det.img_index, -det.scores))
    rank_key = np.empty(n_det, np.int64)
    rank_key[global_order] = np.arange(n_det)
    pairs = _make_pairs(gt, det)
    thr = gt.thresholds
    same = det.labels[pairs.det] == gt.labels[pairs.gt]
    pass_thr = pairs.iou >= thr[pairs.gt]
    cand_plain = same & pairs.overlap & pass_thr
    match = _greedy_match(det, rank_key, pairs, cand_plain, n_gt)
    tp = (match >= 0).astype(np.float64)
    npos = np.bincount(gt.labels, minlength=C).astype(np.float64)
    plain = _accumulate(det, global_order, tp, 1.0 - tp, npos, C, keep_curves)
    result = VidEvalResult(plain=plain, motion={}, motion_source='', class_names=list(gt.class_names))
    if motion is None:
        return result
    if len(motion.values) != n_gt:
        raise VidDetError(f'motion IoU has {len(motion.values)} values for {n_gt} ground-truth objects')
    result.motion_source = motion.source
    # the motion script compares with IoU 0 for non-overlapping pairs (differs only for degenerate objects)
    cand_motion = same & pass_thr
    match_m = match if np.array_equal(cand_motion, cand_plain) else _greedy_match(det, rank_key, pairs, cand_motion, n_gt)
    g_area, d_area = area_plus1(gt.boxes), area_plus1(det.boxes)
    ig_area = (g_area < AREA_RANGE[0]) | (g_area > AREA_RANGE[1])
    det_out_area = (d_area < AREA_RANGE[0]) | (d_area > AREA_RANGE[1])
    gt_per_img = np.bincount(gt.img_index, minlength=len(gt.image_ids)).astype(np.float64)
    n_pairs_det = pairs.det_count
    has_pairs = n_pairs_det > 0
    seg = pairs.det_start[has_pairs]
    matched = match_m >= 0
    for name, (lo, hi) in MOTION_RANGES.items():
        ig = (motion.values < lo) | (motion.values > hi)
        tp_m = np.zeros(n_det)
        fp_m = np.zeros(n_det)
        tp_m[matched] = (~ig[match_m[matched]] & ~ig_area[match_m[matched]]).astype(np.float64)
        # unmatched: compare the best IoU with ignored vs non-ignored objects of the frame (any class)
        ov_ig = np.full(n_det, -1.0)
        ov_nig = np.full(n_det, -1.0)
        if len(seg):
            pig = ig[pairs.gt]
            ov_ig[has_pairs] = np.maximum.reduceat(np.where(pig, pairs.iou, -1.0), seg)
            ov_nig[has_pairs] = np.maximum.reduceat(np.where(~pig, pairs.iou, -1.0), seg)
        ig_frac = np.zeros(len(gt.image_ids))
        np.divide(np.bincount(gt.img_index, weights=ig.astype(np.float64), minlength=len(gt.image_ids)),
                  gt_per_img, out=ig_frac, where=gt_per_img > 0)
        fp_un = np.where(ov_nig > ov_ig, 1.0,
                         np.where(ov_ig > ov_nig, 0.0,
                                  np.where(gt_per_img[det.img_index] == 0, motion.empty_weight(lo, hi),
                                           ig_frac[det.img_index])))
        fp_un[det_out_area] = 0.0
        fp_m[~matched] = fp_un[~matched]
        npos_m = np.bincount(gt.labels[~ig & ~ig_area], minlength=C).astype(np.float64)
        result.motion[name] = _accumulate(det, global_order, tp_m, fp_m, npos_m, C, keep_curves)
    return result
