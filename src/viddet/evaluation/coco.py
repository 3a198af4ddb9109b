"""COCO box AP exactly as MMTracking reports it (``bbox_mAP_50``).

MMTracking 0.14's ``CocoVideoDataset.evaluate(metric='bbox')`` (``mmtrack/datasets/coco_video_dataset.py``)
calls mmdet-2.x ``CocoDataset.evaluate`` (``mmdet/datasets/coco.py``) with ``proposal_nums=(100, 300, 1000)``:
results become ``{image_id, bbox [x1, y1, x2 - x1, y2 - y1], score, category_id}``, then
``pycocotools`` ``COCOeval(iouType='bbox')`` with ``catIds`` = the dataset categories, ``imgIds`` =
every image of the annotation file (frames without objects included), ``maxDets = [100, 300, 1000]``
and the default IoU thresholds 0.50:0.05:0.95. The README's "box AP@50" is ``stats[1]``
(AP at IoU 0.5, all areas, 1000 detections per image).

This module runs that same pycocotools flow; it does not re-implement it.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from viddet.errors import VidDetError
from viddet.fileio import read_json

COCO_STAT_NAMES = ('AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large',
                   'AR@100', 'AR@300', 'AR@1000', 'AR_small@1000', 'AR_medium@1000', 'AR_large@1000')
"""Names of the 12 ``COCOeval.stats`` entries with ``maxDets = [100, 300, 1000]``."""
MMTRACK_MAX_DETS = (100, 300, 1000)


@dataclass
class CocoEvalResult:
    """Output of :func:`coco_evaluate`.

    Attributes:
        stats: the 12 ``COCOeval.stats`` values (fractions; -1 where pycocotools has no data).
        ap50: ``stats[1]`` (MMTracking ``bbox_mAP_50``), 0.0 when there are no detections.
        per_class_ap50: class name -> AP@0.5 from ``eval['precision'][0, :, k, 0, -1]`` (mean of
            the 101 interpolated precisions; None for a class without ground truth).
        precision50: (101, K) interpolated precision at IoU 0.5 per class (-1 where undefined),
            recall thresholds 0:0.01:1; for PR plots.
        class_names: names in ``catIds`` order.
    """

    stats: List[float]
    ap50: float
    per_class_ap50: Dict[str, Optional[float]]
    precision50: Optional[np.ndarray] = None
    class_names: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain-JSON view: stat name -> value, plus ``per_class_ap50``."""
        d = {n: float(v) for n, v in zip(COCO_STAT_NAMES, self.stats)}
        d['per_class_ap50'] = dict(self.per_class_ap50)
        return d


def coco_evaluate(results: Sequence[dict], ann, max_dets: Sequence[int] = MMTRACK_MAX_DETS,
                  verbose: bool = False) -> CocoEvalResult:
    """pycocotools bbox evaluation of COCO-style results, MMTracking's settings.

    Args:
        results: list of ``{image_id, category_id, bbox [x, y, w, h], score}`` (pixels).
        ann: annotation file path, a loaded COCO-VID dict, or a ``pycocotools.coco.COCO``.
        max_dets: ``COCOeval.params.maxDets`` (MMTracking's ``proposal_nums``).
        verbose: let pycocotools print its progress and summary table.

    Returns:
        :class:`CocoEvalResult`.

    Raises:
        VidDetError: if the annotation file cannot be read, or a result refers to an image that is
            not in it.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if isinstance(ann, COCO):
            gt = ann
        else:
            gt = COCO()
            if isinstance(ann, dict):
                gt.dataset = ann
            else:
                gt.dataset = read_json(Path(ann), 'annotation file')
            if not isinstance(gt.dataset, dict) or 'images' not in gt.dataset:
                raise VidDetError(f'{ann if not isinstance(ann, dict) else "<annotations>"}: '
                                  'not a COCO annotation file (no "images")')
            gt.createIndex()
    cat_ids = [c['id'] for c in gt.dataset['categories']]
    names = [str(gt.cats[c].get('name', c)) for c in cat_ids]
    img_ids = [im['id'] for im in gt.dataset['images']]
    if len(results) == 0:
        return CocoEvalResult(stats=[-1.0] * 12, ap50=0.0, per_class_ap50={n: None for n in names},
                              precision50=None, class_names=names)
    known = gt.imgs
    for i, r in enumerate(results):
        if r['image_id'] not in known:
            raise VidDetError(f'result entry {i} has image_id {r["image_id"]!r}, which is not in the annotation file')
    # loadRes adds keys to the dicts it gets: hand it copies
    with quiet:
        dt = gt.loadRes([dict(r, bbox=list(r['bbox'])) for r in results])
        ev = COCOeval(gt, dt, 'bbox')
        ev.params.catIds = cat_ids
        ev.params.imgIds = img_ids
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    prec = ev.eval['precision'][0, :, :, 0, -1]  # (R=101, K) at IoU 0.5, area all, last maxDets
    per_class = {}
    for k, n in enumerate(names):
        p = prec[:, k]
        p = p[p > -1]
        per_class[n] = float(p.mean()) if p.size else None
    return CocoEvalResult(stats=stats, ap50=stats[1], per_class_ap50=per_class,
                          precision50=np.array(prec), class_names=names)
