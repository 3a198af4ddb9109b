"""Files of the evaluation: COCO-VID ground truth in, detections in and out.

* Ground truth: a COCO-VID JSON such as MMTracking's ``imagenet_vid_val.json`` (written by
  ``viddet convert``) -> :class:`GroundTruth`. Boxes ``[x, y, w, h]`` become
  ``(x, y, x + w, y + h)``, which restores the XML integers ``xmin..ymax`` because the converter
  (MMTracking 0.14 ``tools/convert_datasets/ilsvrc/imagenet2coco_vid.py``) stores ``w = xmax - xmin``
  without +1. Objects keep the annotation order within each image (= XML order).
* Detections: a COCO results JSON (``[{image_id, category_id, bbox [x, y, w, h], score}]``, the
  format of pycocotools' ``COCO.loadRes`` and of mmdet-2.x ``CocoDataset.results2json``, which
  MMTracking's ``CocoVideoDataset`` inherits) or the ImageNet VID devkit text format
  (``<frame id> <class 1..C> <score> <x1> <y1> <x2> <y2>``, read by the ILSVRC2015 devkit's
  ``evaluation/eval_vid_detection.m`` and FGFA's ``lib/dataset/imagenet_vid_eval.py``, written by
  FGFA's ``lib/dataset/imagenet_vid.py`` ``write_vid_results`` with ``%.4f`` scores and ``%.2f``
  coordinates) -> list of COCO result dicts -> :class:`DetectionArrays` (:func:`results_to_arrays`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from viddet.errors import VidDetError
from viddet.evaluation.iou import iou_thresholds
from viddet.fileio import atomic_write_json, atomic_write_text, read_json


# ===================================================================================== ground truth
@dataclass
class GroundTruth:
    """Ground truth of an evaluation set, flattened to arrays.

    Attributes:
        ann_file: source file ('' when built in memory).
        image_ids: (n_img,) int64 COCO image ids in file order (the frame order of the devkit).
        video_ids, frame_ids: (n_img,) int64 (-1 when the file has no videos).
        cat_ids: category ids in file order; label k (0-based) <-> ``cat_ids[k]``.
        class_names: category names, same order.
        img_index: (n_gt,) int64 index into ``image_ids`` of each object, non-decreasing.
        labels: (n_gt,) int64 0-based class.
        boxes: (n_gt, 4) float64 (xmin, ymin, xmax, ymax), XML pixel convention.
        instance_ids: (n_gt,) int64 track id (-1 when absent).
    """

    ann_file: str
    image_ids: np.ndarray
    video_ids: np.ndarray
    frame_ids: np.ndarray
    cat_ids: List[int]
    class_names: List[str]
    img_index: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    instance_ids: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def thresholds(self) -> np.ndarray:
        """(n_gt,) per-object IoU threshold ``min(0.5, wh / ((w+10)(h+10)))``, w/h with +1
        (:func:`viddet.evaluation.iou.iou_thresholds`)."""
        return iou_thresholds(self.boxes)


@dataclass
class DetectionArrays:
    """Detections flattened to arrays (frame index into the ground truth's ``image_ids``).

    Attributes:
        img_index: (n,) int64; labels: (n,) int64 0-based; scores: (n,) float64;
        boxes: (n, 4) float64 (x1, y1, x2, y2) in original-image pixels.
    """

    img_index: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    def __len__(self):
        return int(self.scores.shape[0])


def load_ground_truth(ann) -> GroundTruth:
    """Reads a COCO(-VID) annotation file (or an already loaded dict) into :class:`GroundTruth`.

    Objects keep the order of the ``annotations`` list within each image (the converter writes
    them in XML order, which the motion-IoU .mat relies on). Every annotation counts as ground
    truth (the devkit has no ``iscrowd``/ignore notion).

    Raises:
        VidDetError: missing/invalid file, missing keys, duplicate image ids, annotations that refer
            to unknown images or categories, or malformed boxes; the message names file and entry.
    """
    name = '' if isinstance(ann, dict) else str(ann)
    data = ann if isinstance(ann, dict) else read_json(Path(ann), 'annotation file')
    where = name or '<annotations>'
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ('images', 'annotations', 'categories')):
        raise VidDetError(f'{where}: expected a COCO JSON object with "images", "annotations" and "categories" lists')
    cats = data['categories']
    cat_ids = [c['id'] for c in cats]
    if len(set(cat_ids)) != len(cat_ids):
        raise VidDetError(f'{where}: duplicate category ids')
    cat_to_label = {c: i for i, c in enumerate(cat_ids)}
    images = data['images']
    try:
        image_ids = np.array([im['id'] for im in images], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise VidDetError(f'{where}: every image needs an integer "id" ({e})') from None
    if len(np.unique(image_ids)) != len(image_ids):
        raise VidDetError(f'{where}: duplicate image ids')
    video_ids = np.array([im.get('video_id', -1) for im in images], dtype=np.int64)
    frame_ids = np.array([im.get('frame_id', -1) for im in images], dtype=np.int64)
    id_to_index = {int(i): k for k, i in enumerate(image_ids)}
    anns = data['annotations']
    n = len(anns)
    img_index = np.empty(n, np.int64)
    labels = np.empty(n, np.int64)
    boxes = np.empty((n, 4), np.float64)
    inst = np.full(n, -1, np.int64)
    for k, a in enumerate(anns):
        try:
            img_index[k] = id_to_index[a['image_id']]
        except (KeyError, TypeError):
            raise VidDetError(f'{where}: annotation {k} (id {a.get("id")!r}) refers to unknown image_id '
                              f'{a.get("image_id")!r}') from None
        try:
            labels[k] = cat_to_label[a['category_id']]
        except (KeyError, TypeError):
            raise VidDetError(f'{where}: annotation {k} (id {a.get("id")!r}) has unknown category_id '
                              f'{a.get("category_id")!r}') from None
        b = a.get('bbox')
        if not (isinstance(b, (list, tuple)) and len(b) == 4):
            raise VidDetError(f'{where}: annotation {k} (id {a.get("id")!r}) has bbox {b!r}, expected [x, y, w, h]')
        x, y, w, h = b
        boxes[k] = (x, y, x + w, y + h)
        if a.get('instance_id') is not None:
            inst[k] = a['instance_id']
    order = np.argsort(img_index, kind='stable')
    return GroundTruth(ann_file=name, image_ids=image_ids, video_ids=video_ids, frame_ids=frame_ids,
                       cat_ids=cat_ids, class_names=[str(c.get('name', c['id'])) for c in cats],
                       img_index=img_index[order], labels=labels[order], boxes=boxes[order],
                       instance_ids=inst[order])


# ===================================================================================== detections
def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _check_result_entry(r, i, where):
    if not isinstance(r, dict):
        raise VidDetError(f'{where}: entry {i} is a {type(r).__name__}, expected an object '
                          '{image_id, category_id, bbox, score}')
    for key in ('image_id', 'category_id', 'bbox', 'score'):
        if key not in r:
            raise VidDetError(f'{where}: entry {i} has no "{key}"')
    b = r['bbox']
    if not (isinstance(b, (list, tuple, np.ndarray)) and len(b) == 4 and all(_is_real(v) for v in b)):
        raise VidDetError(f'{where}: entry {i} has bbox {b!r}, expected 4 finite numbers [x, y, w, h]')
    if not _is_real(r['score']):
        raise VidDetError(f'{where}: entry {i} has score {r["score"]!r}, expected a finite number')
    for key in ('image_id', 'category_id'):
        if not isinstance(r[key], numbers.Integral) or isinstance(r[key], (bool, np.bool_)):
            raise VidDetError(f'{where}: entry {i} has {key} {r[key]!r}, expected an integer')


def validate_results(results, where: str = '<results>') -> list:
    """Checks a list of COCO result dicts ``{image_id, category_id, bbox [x, y, w, h], score}``.

    Returns:
        ``results`` unchanged.

    Raises:
        VidDetError: naming ``where`` and the index of the first malformed entry.
    """
    if not isinstance(results, list):
        raise VidDetError(f'{where}: expected a JSON list of detections, got a {type(results).__name__}')
    for i, r in enumerate(results):
        _check_result_entry(r, i, where)
    return results


def load_results(path, ann: Optional[GroundTruth] = None) -> list:
    """Loads detections from a COCO results JSON or an official-format detection txt.

    Args:
        path: ``*.json`` (a list of ``{image_id, category_id, bbox [x, y, w, h], score}``, the
            format of ``pycocotools``' ``loadRes`` and of :func:`write_coco_results`), or a text
            file of lines ``<frame id> <class 1..C> <score> <x1> <y1> <x2> <y2>`` (the devkit
            format of :func:`write_vid_txt`; needs ``ann`` to map class numbers to category ids).
        ann: ground truth used for the txt format.

    Returns:
        list of COCO result dicts.

    Raises:
        VidDetError: missing file, invalid JSON, or a malformed entry/line (named by index or line
            number).
    """
    path = Path(path)
    if path.suffix.lower() == '.txt':
        if ann is None:
            raise VidDetError(f'{path}: reading a devkit txt needs the annotation file')
        out = []
        try:
            f = open(path, 'r')
        except OSError as e:
            raise VidDetError(f'{path}: cannot read detections ({e})') from None
        with f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    if len(parts) != 7:
                        raise ValueError
                    fid, cls = int(parts[0]), int(parts[1])
                    s, x1, y1, x2, y2 = (float(v) for v in parts[2:])
                except ValueError:
                    raise VidDetError(f'{path}:{lineno}: expected "<frame id> <class> <score> <x1> <y1> <x2> <y2>", '
                                      f'got {line.strip()!r}') from None
                if not 1 <= cls <= ann.num_classes:
                    raise VidDetError(f'{path}:{lineno}: class {cls} outside 1..{ann.num_classes}')
                out.append(dict(image_id=fid, category_id=ann.cat_ids[cls - 1], bbox=[x1, y1, x2 - x1, y2 - y1], score=s))
        return out
    data = read_json(path, 'results file')
    return validate_results(data, str(path))


def results_to_arrays(results, gt: GroundTruth, where: str = '<results>') -> DetectionArrays:
    """COCO result dicts -> :class:`DetectionArrays` (boxes ``[x, y, w, h]`` -> ``x1, y1, x2, y2``).

    Raises:
        VidDetError: an entry whose image or category is not in the ground truth (named by index).
    """
    n = len(results)
    img = np.empty(n, np.int64)
    cat = np.empty(n, np.int64)
    scores = np.empty(n, np.float64)
    boxes = np.empty((n, 4), np.float64)
    try:
        for i, r in enumerate(results):
            img[i] = r['image_id']
            cat[i] = r['category_id']
            scores[i] = r['score']
            x, y, w, h = r['bbox']
            boxes[i] = (x, y, x + w, y + h)
    except (KeyError, TypeError, ValueError, OverflowError):
        validate_results(results, where)  # raises with the entry index
        raise
    order = np.argsort(gt.image_ids, kind='stable')
    sorted_ids = gt.image_ids[order]
    pos = np.searchsorted(sorted_ids, img)
    pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    ok = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == img) if len(sorted_ids) else np.zeros(n, bool)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise VidDetError(f'{where}: entry {i} has image_id {int(img[i])}, which is not in the annotation file '
                          f'{gt.ann_file or ""} ({int((~ok).sum())} such entries)')
    cat_lookup = {c: k for k, c in enumerate(gt.cat_ids)}
    labels = np.empty(n, np.int64)
    for c in np.unique(cat):
        if int(c) not in cat_lookup:
            i = int(np.flatnonzero(cat == c)[0])
            raise VidDetError(f'{where}: entry {i} has category_id {int(c)}, which is not a category of the '
                              f'annotation file {gt.ann_file or ""}')
        labels[cat == c] = cat_lookup[int(c)]
    return DetectionArrays(img_index=order[pos_c], labels=labels, scores=scores, boxes=boxes)


def write_coco_results(results, path) -> Path:
    """Writes COCO result dicts as JSON (atomically); numpy scalars become plain numbers. A
    ``track_id`` (linked results, :mod:`viddet.linking`) is kept."""
    return atomic_write_json(path, [dict(image_id=int(r['image_id']), category_id=int(r['category_id']),
                                         bbox=[float(v) for v in r['bbox']], score=float(r['score']),
                                         **({'track_id': int(r['track_id'])} if 'track_id' in r else {}))
                                    for r in results])


def write_vid_txt(results, gt: GroundTruth, path) -> Path:
    """Writes detections in the devkit format (atomically), one line per box:
    ``<global frame id> <class 1..C> <score %.4f> <x1 %.2f> <y1> <x2> <y2>``.

    The frame id is the COCO image id (equal to the global frame id for MMTracking's
    ``imagenet_vid_val.json``); the class is the 1-based position of the category in the
    annotation file (= the category id for ImageNet VID). Lines follow frame order, then input
    order, like FGFA's ``write_vid_results``.
    """
    d = results_to_arrays(results, gt, str(path))
    order = np.lexsort((np.arange(len(d)), d.img_index))
    fids = gt.image_ids[d.img_index[order]]
    lab = d.labels[order] + 1
    sc = d.scores[order]
    bx = d.boxes[order]
    lines = [f'{int(f)} {int(c)} {s:.4f} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}\n'
             for f, c, s, b in zip(fids.tolist(), lab.tolist(), sc.tolist(), bx.tolist())]
    return atomic_write_text(path, ''.join(lines))


def devkit_round(x: np.ndarray, decimals: int) -> np.ndarray:
    """``float(f'{v:.{decimals}f}')`` for every element (what writing and re-reading the devkit txt
    does), vectorised: ``np.round`` except for values within 1e-6 of a rounding half-way point,
    which are formatted exactly by Python."""
    x = np.asarray(x, dtype=np.float64)
    scale = 10.0 ** decimals
    y = np.round(x, decimals)
    frac = np.abs(x * scale - np.floor(x * scale))
    near = np.abs(frac - 0.5) < 1e-6
    if near.any():
        idx = np.flatnonzero(near)
        y.flat[idx] = [float(f'{v:.{decimals}f}') for v in x.flat[idx].tolist()]
    return y

