"""IoU and NMS with the +1 pixel convention, in the operation order of FGFA's reference code
(``lib/nms/seq_nms.py``, ``lib/nms/nms.py``), as :mod:`viddet.linking.seqnms` needs them bit for bit."""
from __future__ import annotations

import numpy as np


def iou_plus1(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU with the +1 pixel convention, in the original's operation order.

    Args:
        boxes1: (n, 4) float64 (x1, y1, x2, y2), pixels.
        boxes2: (m, 4) float64.

    Returns:
        (n, m) float64 IoU ``inter / (area1 + area2 - inter)``.
    """
    return iou_pairs(boxes1[:, None, :], boxes2[None, :, :])


def iou_pairs(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """IoU of broadcast box arrays b1[..., 4] and b2[..., 4] (+1 convention); NaN boxes give NaN.

    Same operations in the same order as the original (``w = min(x2) - max(x1) + 1``, ...,
    ``inter / (area1 + area2 - inter)``), in place where possible."""
    area1 = (b1[..., 2] - b1[..., 0] + 1) * (b1[..., 3] - b1[..., 1] + 1)
    area2 = (b2[..., 2] - b2[..., 0] + 1) * (b2[..., 3] - b2[..., 1] + 1)
    w = np.minimum(b1[..., 2], b2[..., 2])
    w -= np.maximum(b1[..., 0], b2[..., 0])
    w += 1
    np.maximum(w, 0.0, out=w)
    h = np.minimum(b1[..., 3], b2[..., 3])
    h -= np.maximum(b1[..., 1], b2[..., 1])
    h += 1
    np.maximum(h, 0.0, out=h)
    w *= h
    union = area1 + area2
    union -= w
    return np.divide(w, union, out=w)

def nms_plus1(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS with the +1 pixel convention, as FGFA's ``lib/nms/nms.py`` ``nms`` (py-faster-rcnn).

    Boxes are visited by decreasing score (ties: the later box first, i.e. ``argsort()[::-1]`` of a
    stable sort); each kept box removes the remaining ones whose IoU with it is ``> iou``.

    Args:
        boxes: (n, 4) float64 pixels. scores: (n,). iou: suppression threshold.

    Returns:
        (k,) int64 indices of the kept boxes, ascending.
    """
    order = np.argsort(scores, kind='stable')[::-1]
    ov = iou_plus1(boxes, boxes) > iou
    alive = np.ones(len(order), dtype=bool)
    keep = []
    for i in order.tolist():
        if alive[i]:
            keep.append(i)
            alive &= ~ov[i]
    return np.sort(np.array(keep, dtype=np.int64))
