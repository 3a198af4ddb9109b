"""Seq-NMS: offline linking of per-frame detections into tubes, with rescoring and suppression.

Han et al., "Seq-NMS for Video Object Detection", 2016 (arXiv:1602.08465), Sec. 3, with the exact
semantics of FGFA's reference code (github msracver/Flow-Guided-Feature-Aggregation,
``lib/nms/seq_nms.py``: ``createLinks``, ``maxPath``, ``findMaxPath``, ``rescore``, ``deleteLink``):

Per class independently, over the whole video:

1. **Links**: box *i* of frame *t* is linked to box *j* of frame *t + 1* when their IoU is
   ``>= link_iou`` (0.5). IoU uses the +1 pixel convention of the original:
   ``area = (x2 - x1 + 1) * (y2 - y1 + 1)``, ``inter = max(0, min(x2) - max(x1) + 1) * (same in y)``,
   ``IoU = inter / (area_1 + area_2 - inter)``.
2. **Best path**: dynamic programming over frames, ``a[t, j] = s_j + max(0, max_i a[t - 1, i])`` over
   the boxes *i* linked to *j* (the predecessor is the first *i* reaching the maximum); the path ends
   at the first maximum of ``a`` in (frame, box) order and is followed back.
3. **Stop** when the best path sum is ``< min_path_score`` (0.01) or no link is left (also before the
   first path: a class without any link is returned unchanged).
4. **Rescore** the path's boxes: ``'avg'`` = path sum / path length (Seq-NMS's default, the original's
   ``rescore``), ``'max'`` = the path's highest score, ``'none'`` = scores unchanged (the paper's
   Sec. 3 "average" and "max" rescoring).
5. **Suppress** in each frame of the path the other boxes whose IoU with the path box is
   ``>= suppress_iou`` (0.3); they are removed from the output and their links go. The path boxes
   take no further part (their links go too). Repeat from 2.

Boxes that never lie on a path and are never suppressed are kept with their original scores (as in
the original's output). Everything is computed in float64; ties resolve as in the original.

The original recomputes the whole dynamic programme and its Python box-pair loops for every path.
Here the result is the same but the work is incremental (:mod:`viddet.linking.seqnms_paths`):

* links (and the within-frame overlaps used to suppress) come from vectorised IoU over padded
  chunks of frames, one class at a time;
* the dynamic programme runs only over *linked* boxes (boxes with at least one link), one numpy
  step per frame; after a path only the frames whose scores or links changed are recomputed, and
  the recomputation stops at the first later frame whose values did not change;
* boxes without any link (never linked, or whose links have all gone) can only be single-box paths
  with their own score: they wait in a score-sorted queue, and each step takes the better of the
  queue head and the dynamic programme's maximum (same key: sum, then frame, then box order).

Complexity per class: O(sum_t n_t n_{t+1} + sum_t n_t^2) for links and overlaps plus, per path,
O(n_t n_{t+1}) for each recomputed frame (usually the path's frames and one more; in the worst case
a change propagates to the end of the video, which is what the original pays for every path).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from viddet.linking.iou import nms_plus1
from viddet.linking.seqnms_paths import seq_nms_paths

LINK_IOU = 0.5
"""IoU (+1 pixel convention) from which two boxes of consecutive frames are linked (FGFA ``IOU_THRESH``)."""
SUPPRESS_IOU = 0.3
"""IoU (+1 pixel convention) from which a box of a path frame is suppressed by the path box (``NMS_THRESH``)."""
MIN_PATH_SCORE = 0.01
"""Linking stops once the best path's score sum is below this (FGFA ``MAX_THRESH``)."""
RESCORING = ('avg', 'max', 'none')
"""Rescoring variants: path mean (Seq-NMS default), path max, none."""


def seq_nms_class(boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray], rescore: str = 'avg',
                  link_iou: float = LINK_IOU, suppress_iou: float = SUPPRESS_IOU,
                  min_path_score: float = MIN_PATH_SCORE) -> Tuple[List[np.ndarray], List[np.ndarray],
                                                                    List[np.ndarray]]:
    """Seq-NMS of one class over one video (FGFA ``maxPath`` for one ``cls_ind``).

    Args:
        boxes: per frame, (n_t, 4) (x1, y1, x2, y2) pixels of this class (n_t may be 0); float64.
        scores: per frame, (n_t,) scores >= 0, same order; float64.
        rescore: ``'avg'`` | ``'max'`` | ``'none'`` (see the module docstring).
        link_iou, suppress_iou, min_path_score: thresholds, defaults as in the original.

    Returns:
        ``(keep, new_scores, path_ids)``, per frame: (n_t,) bool kept (not suppressed), (n_t,) float64
        scores after rescoring (for all boxes; suppressed ones keep their input score), (n_t,) int64
        index of the path the box was taken on (0, 1, ... in the order the paths were found; -1 for
        boxes on no path).
    """
    counts = np.array([len(x) for x in scores], dtype=np.int64)
    cat_b = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, 4) for x in boxes]) if len(boxes) \
        else np.zeros((0, 4))
    cat_s = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in scores]) if len(scores) \
        else np.zeros(0)
    keep, new, pid = seq_nms_paths(cat_b, cat_s, counts, rescore, link_iou, suppress_iou, min_path_score)
    cuts = np.cumsum(counts)[:-1]
    return np.split(keep, cuts), np.split(new, cuts), np.split(pid, cuts)


def seq_nms(boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray], labels: Sequence[np.ndarray],
            rescore: str = 'avg', link_iou: float = LINK_IOU, suppress_iou: float = SUPPRESS_IOU,
            min_path_score: float = MIN_PATH_SCORE,
            frame_nms_iou: Optional[float] = None) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
    """Seq-NMS over one video, every class independently (FGFA ``seq_nms``).

    Args:
        boxes: per frame, (n_t, 4) array (x1, y1, x2, y2), pixels; converted to float64.
        scores: per frame, (n_t,) scores >= 0.
        labels: per frame, (n_t,) integer class indices. Within a class, the input order of a frame is
            the box order used for ties (like the original's per-class arrays).
        rescore, link_iou, suppress_iou, min_path_score: see :func:`seq_nms_class`.
        frame_nms_iou: if given, a per-frame, per-class :func:`nms_plus1` at this IoU on the kept
            boxes afterwards, as FGFA's evaluation does (``lib/dataset/imagenet_vid.py``,
            ``write_vid_results_multiprocess``: 0.3). Default None: Seq-NMS alone (``seq_nms``'s output).

    Returns:
        ``(keep, new_scores, tube_ids)``, per frame: (k_t,) int64 indices of the kept boxes into the
        frame's input, ascending; (k_t,) float64 their scores after rescoring; (k_t,) int64 tube ids.
        Tube ids are unique over the video: first the paths, class by class in increasing label
        order and within a class in the order they were found (decreasing score sum), then every
        kept box that lies on no path as a tube of its own, in (frame, input index) order.

    Raises:
        ValueError: unknown ``rescore`` (callers validate user input; see ``viddet.linking.link.link_video``).
    """
    if rescore not in RESCORING:
        raise ValueError(f'unknown rescoring {rescore!r}; expected one of {RESCORING}')
    num_f = len(boxes)
    counts = np.array([len(x) for x in scores], dtype=np.int64)
    if num_f == 0:
        return [], [], []
    cat_b = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, 4) for x in boxes])
    cat_s = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in scores])
    cat_l = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in labels])
    frame_of = np.repeat(np.arange(num_f), counts)
    off = np.concatenate(([0], np.cumsum(counts)))
    order = np.lexsort((np.arange(len(cat_l)), frame_of, cat_l))   # by class, frame, input order
    classes, starts = np.unique(cat_l[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    keep = np.zeros(len(cat_s), dtype=bool)
    out_scores = cat_s.copy()
    tube = np.full(len(cat_s), -1, dtype=np.int64)
    next_id = 0
    for st, en in zip(starts.tolist(), ends.tolist()):
        idx = order[st:en]
        k, s, p = seq_nms_paths(cat_b[idx], cat_s[idx], np.bincount(frame_of[idx], minlength=num_f),
                                rescore, link_iou, suppress_iou, min_path_score)
        keep[idx] = k
        out_scores[idx] = s
        tube[idx] = np.where(p >= 0, p + next_id, -1)
        next_id += int(p.max()) + 1 if len(p) and p.max() >= 0 else 0
    cuts = np.cumsum(counts)[:-1]
    if frame_nms_iou is not None:
        for t, (k, lab) in enumerate(zip(np.split(keep, cuts), np.split(cat_l, cuts))):
            for c in np.unique(lab[k]).tolist():
                idx = np.flatnonzero(k & (lab == c))
                if len(idx) > 1:
                    k[idx] = False
                    k[idx[nms_plus1(cat_b[off[t] + idx], out_scores[off[t] + idx], frame_nms_iou)]] = True
    lone = keep & (tube < 0)
    tube[lone] = next_id + np.arange(int(lone.sum()))
    kept = [np.flatnonzero(k) for k in np.split(keep, cuts)]
    return (kept, [s[k] for s, k in zip(np.split(out_scores, cuts), kept)],
            [x[k] for x, k in zip(np.split(tube, cuts), kept)])
