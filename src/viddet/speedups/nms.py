"""Early-stopping greedy NMS: the first ``max_keep`` boxes that the full NMS keeps, exactly, for
inference.

The detector uses only the first boxes NMS keeps: 300 proposals of the RPN's ~6000 (mmdet
``RPNHead._bbox_post_process``), 100 detections of up to ~9000 (box, class) pairs
(``multiclass_nms``). Greedy NMS decides each box from the boxes kept before it in its visiting
order alone, so the first K kept boxes of the full NMS are exactly those of a greedy NMS that stops
once it has kept K, and most of the ~O(N x kept) IoU work of ``torchvision.ops.nms`` can be skipped.

:func:`first_kept` visits the boxes in the same order as the plain path
(:func:`viddet.models.boxes.batched_nms`: the same class-offset boxes, the same torch sort) in
windows of candidates: a vectorised IoU of the window against the boxes kept so far, then, a
group of survivors at a time, one of the group against each other and a short sequential pass.
The IoU arithmetic is torchvision's CPU kernel's (``torchvision/csrc/ops/cpu/nms_kernel.cpp``), op
by op in float32: area = (x2 - x1) * (y2 - y1); w = max(0, min(x2, x2') - max(x1, x1')), h alike;
inter = w * h; iou = inter / (area + area' - inter); suppressed when the float32 iou, as a double,
is > the threshold. So every suppression decision, and hence the kept list and its order, is the
same as the plain path's.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from viddet.models.boxes import PER_CLASS_NMS_FROM, class_offset_boxes

GROUP = 64         # candidates resolved together (a GROUP x GROUP IoU matrix)
KEPT_CHUNK = 64    # kept boxes tested against the candidates at a time
MAX_WINDOW = 1024  # candidates filtered by the kept boxes at a time
MIN_BOXES_PER_KEPT = 4  # head_nms: fewer boxes than this x max_keep go to the plain kernel


def float32_threshold(iou_threshold: float) -> np.float32:
    """The largest float32 f with double(f) <= ``iou_threshold``: for every float32 iou,
    ``iou > f`` (in float32) is the C++ kernel's ``double(iou) > iou_threshold``."""
    f = np.float32(iou_threshold)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > iou_threshold else f


def _suppresses(kept: np.ndarray, kept_area: np.ndarray, cand: np.ndarray, cand_area: np.ndarray,
                threshold: np.float32) -> np.ndarray:
    """(k, m) bool: IoU(kept box a, candidate b) > threshold (:func:`float32_threshold`), in
    torchvision's float32 order of operations (module docstring). kept (k, 4), cand (m, 4)
    float32 boxes, areas (k,), (m,)."""
    zero = np.float32(0)
    w = np.maximum(zero, np.minimum(kept[:, None, 2], cand[None, :, 2]) - np.maximum(kept[:, None, 0], cand[None, :, 0]))
    h = np.maximum(zero, np.minimum(kept[:, None, 3], cand[None, :, 3]) - np.maximum(kept[:, None, 1], cand[None, :, 1]))
    inter = w * h
    with np.errstate(divide='ignore', invalid='ignore'):   # 0 / 0 = NaN (two empty boxes) never suppresses
        return inter / (kept_area[:, None] + cand_area[None, :] - inter) > threshold


def _survivors(boxes, areas, cand: np.ndarray, kept: np.ndarray, threshold) -> np.ndarray:
    """The rows of ``cand`` that no row of ``kept`` suppresses, in order; the kept boxes are tested
    KEPT_CHUNK at a time, earliest first, each chunk against what the earlier ones left."""
    for c in range(0, len(kept), KEPT_CHUNK):
        if not len(cand):
            break
        kk = kept[c:c + KEPT_CHUNK]
        cand = cand[~_suppresses(boxes[kk], areas[kk], boxes[cand], areas[cand], threshold).any(axis=0)]
    return cand


def greedy_first_kept(boxes: np.ndarray, iou_threshold: float, max_keep: int) -> np.ndarray:
    """Greedy NMS over ``boxes`` in row order, stopped once ``max_keep`` (>= 1) are kept.

    The rows are visited in windows: a window's candidates are first filtered by the boxes kept
    before it, then resolved GROUP at a time (filtered by the boxes the window has kept so far,
    then one by one against each other). A window is as long as the survival rate so far says is
    needed to keep ``max_keep`` (at most MAX_WINDOW), so that little is computed past the last
    kept box.

    Args:
        boxes: (N, 4) float32 (x1, y1, x2, y2), finite, in visiting order (best first).
        iou_threshold: a box is dropped when its IoU with an earlier kept box is > this.

    Returns:
        (k,) int64 row numbers of the kept boxes, increasing, k <= max_keep.
    """
    threshold = float32_threshold(iou_threshold)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = np.empty(min(max_keep, len(boxes)), dtype=np.int64)
    k = visited = 0
    while visited < len(boxes):
        size = len(kept) if not k else min(MAX_WINDOW, ((len(kept) - k) * visited + k - 1) // k)
        window = np.arange(visited, min(visited + max(size, GROUP), len(boxes)))
        visited += len(window)
        before = k
        window = _survivors(boxes, areas, window, kept[:before], threshold)
        for g in range(0, len(window), GROUP):
            cand = _survivors(boxes, areas, window[g:g + GROUP], kept[before:k], threshold)
            within = _suppresses(boxes[cand], areas[cand], boxes[cand], areas[cand], threshold)
            alive = np.ones(len(cand), dtype=bool)
            for i in range(len(cand)):
                if alive[i]:
                    kept[k] = cand[i]
                    k += 1
                    if k == len(kept):
                        return kept
                    alive[i + 1:] &= ~within[i, i + 1:]
    return kept[:k]


def first_kept(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
               max_keep: int) -> Optional[torch.Tensor]:
    """``batched_nms(boxes, scores, idxs, iou_threshold)[:max_keep]``
    (:func:`viddet.models.boxes.batched_nms`), the same indices in the same order, by an
    early-stopping greedy NMS (module docstring).

    Args:
        boxes: (N, 4) float32 CPU (x1, y1, x2, y2), pixels. scores: (N,) float32. idxs: (N,) int
            class ids (boxes of different ids never suppress each other).
        max_keep: how many kept boxes are wanted (>= 1).

    Returns:
        (k,) int64 CPU indices into ``boxes``, k <= max_keep; None where this does not apply and the
        plain path must run: not a float32 CPU tensor, max_keep < 1, non-finite boxes, or from
        ``PER_CLASS_NMS_FROM`` boxes on (mmcv's class-by-class branch ends with a re-sort of all
        kept boxes whose order of tied scores depends on every kept box).
    """
    if (boxes.device.type != 'cpu' or boxes.dtype != torch.float32 or scores.dtype != torch.float32
            or max_keep < 1 or boxes.shape[0] >= PER_CLASS_NMS_FROM):
        return None
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.int64)
    boxes, scores = boxes.detach(), scores.detach()   # indices only: nothing to differentiate
    order = scores.sort(descending=True)[1]           # the plain path's visiting order (viddet.models.boxes.nms)
    visited = class_offset_boxes(boxes, idxs)[order].numpy()
    if not np.isfinite(visited).all():
        return None
    return order[torch.from_numpy(greedy_first_kept(visited, iou_threshold, max_keep))]


def head_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
             max_keep: int) -> Optional[torch.Tensor]:
    """``RPNHead.nms`` / ``RoIHead.nms`` (``viddet.models.detector``; the same arguments) by
    :func:`first_kept`, for :class:`viddet.speedups.detector.FastRPNHead` and ``FastRoIHead``; None
    (the plain NMS runs) where that does not apply, or where the early stop cannot save much (fewer than
    ``MIN_BOXES_PER_KEPT`` x ``max_keep`` boxes: torchvision's scalar loop is then as fast)."""
    if boxes.shape[0] < MIN_BOXES_PER_KEPT * max_keep:
        return None
    return first_kept(boxes, scores, idxs, iou_threshold, max_keep)
