"""Box overlap as the ImageNet VID devkit measures it: the +1-pixel convention and the per-object
IoU threshold that relaxes matching for small objects.

Boxes are (n, 4) float64 ``(x1, y1, x2, y2)`` in the XML pixel convention, where a box covers the
pixels ``x1..x2`` inclusive, so its width is ``x2 - x1 + 1``. Source: ``parse_vid_rec`` (threshold)
and the overlap loops of ``vid_eval`` / ``vid_eval_motion`` in FGFA's ``lib/dataset/imagenet_vid_eval.py``
and ``lib/dataset/imagenet_vid_eval_motion.py`` (msracver/Flow-Guided-Feature-Aggregation), which
follow the ILSVRC devkit's ``eval_vid_detection.m``.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

PIXEL_TOLERANCE = 10.0
"""``pixelTolerance`` of ``parse_vid_rec``, pixels."""
DEFAULT_IOU_THR = 0.5
"""``defaultIOUthr`` of ``parse_vid_rec``: the threshold of every object that is not small."""


def area_plus1(boxes: np.ndarray) -> np.ndarray:
    """(n,) ``(x2 - x1 + 1) * (y2 - y1 + 1)``, square pixels (negative for inverted boxes)."""
    return (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)


def iou_plus1(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Element-wise devkit IoU of boxes ``a`` and ``b`` ((n, 4) x1, y1, x2, y2, +1 convention):
    ``iw = min(x2) - max(x1) + 1`` (likewise ``ih``), ``union = area_a + area_b - iw * ih``.

    Returns:
        (iou (n,), overlaps (n,) bool: iw > 0 and ih > 0); iou is 0 where they do not overlap.
    """
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1.0
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1.0
    ok = (iw > 0) & (ih > 0)
    inter = iw * ih
    ua = area_plus1(a) + area_plus1(b) - inter
    with np.errstate(divide='ignore', invalid='ignore'):
        iou = np.where(ok, inter / ua, 0.0)
    return iou, ok


def iou_thresholds(boxes: np.ndarray) -> np.ndarray:
    """(n,) per-object IoU threshold ``min(0.5, w h / ((w + 10)(h + 10)))`` with ``w = x2 - x1 + 1``,
    ``h = y2 - y1 + 1``: a detection matches an object when its IoU is at least this value."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    with np.errstate(divide='ignore', invalid='ignore'):
        thr = (w * h) / ((w + PIXEL_TOLERANCE) * (h + PIXEL_TOLERANCE))
    return np.minimum(thr, DEFAULT_IOU_THR)
