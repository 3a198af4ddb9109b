"""Official ImageNet VID mAP, its FGFA motion breakdown (slow/medium/fast), and result I/O.

Semantics follow the devkit as shipped with FGFA (``lib/dataset/imagenet_vid_eval.py`` and
``imagenet_vid_eval_motion.py``; REFERENCE.md §9.2), re-implemented vectorised with numpy:

* IoU with the +1 pixel convention: ``iw = min(x2) - max(x1) + 1`` (likewise ``ih``), both > 0;
  ``union = (w_d + 1)(h_d + 1) + (w_g + 1)(h_g + 1) - iw * ih``.
* per-object threshold ``thr = min(0.5, w h / ((w + 10)(h + 10)))`` with ``w = xmax - xmin + 1``,
  ``h = ymax - ymin + 1`` (small objects are matched with a relaxed IoU).
* matching per image, detections in descending score order: each takes the not yet detected
  ground-truth object of its class with the largest IoU among those with ``IoU >= thr``
  (first object in annotation order on ties); TP if found, else FP.
* AP per class: all detections of the class over the data set in descending score order,
  cumulative TP/FP, recall = TP / npos, precision = TP / max(TP + FP, eps), VOC all-points AP
  (monotone precision envelope, sum of recall steps x precision); mAP = mean over classes.
* motion bins ``fast [0, 0.7]``, ``medium [0.7, 0.9]``, ``slow [0.9, 1]``, bounds inclusive (a
  motion IoU of exactly 0.7 or 0.9 is in two bins). Per bin, objects outside the bin are ignored:
  a detection matched to an ignored object is neither TP nor FP; an unmatched detection is a full
  FP if it overlaps a non-ignored object more than any ignored one, not an FP if the reverse,
  ``empty_weight`` (share of all motion-IoU values of the .mat inside the bin) if its frame has no
  ground truth, and otherwise (a tie) the fraction of the frame's objects that are ignored; npos
  counts only non-ignored objects; classes without objects in the bin are left out of the mean.
  The (inactive) area range ``[0, 1e10]`` of the original is kept, including its effect on
  boxes of negative area.

Deliberate, documented differences to the original scripts:

* **Ties in score** are broken by frame order, then by the order of the input (the original uses
  numpy's non-stable quicksort, whose tie order is unspecified). Scores are quantised like the
  devkit's text file (``%.4f``, boxes ``%.2f``) unless ``devkit_rounding=False``.
* **Classes without ground truth** are left out of the plain mAP as they are in the motion mAP
  (the original plain script averages all 30 classes and yields 0 or NaN for such a class; on
  the full ImageNet VID val set every class has objects, so the numbers are identical).

Ground truth is read from a COCO-VID JSON (``imagenet_vid_val.json``; boxes ``[x, y, w, h]`` ->
``xmax = x + w``, which restores the XML integers). Motion IoU comes from the official
``imagenet_vid_groundtruth_motion_iou.mat`` (cell ``image_id - 1``, one value per object in XML
order, an empty cell reads as a single 0) or, when no file is given, is computed from the ground
truth with the FGFA paper's definition (:func:`compute_motion_iou`), and then labelled as computed.
"""
from __future__ import annotations

import io
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from viddet.errors import VidDetError
from viddet.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

PIXEL_TOLERANCE = 10.0
DEFAULT_IOU_THR = 0.5
AREA_RANGE = (0.0, 1e5 * 1e5)
MOTION_RANGES = {'all': (0.0, 1.0), 'fast': (0.0, 0.7), 'medium': (0.7, 0.9), 'slow': (0.9, 1.0)}
"""FGFA ``motion_ranges`` (inclusive bounds); 'all' is the full range."""
MOTION_NEIGHBOURHOOD = 10
"""Frames on each side used by :func:`compute_motion_iou` (FGFA paper: +-10 frames)."""
_EPS = np.finfo(np.float64).eps

# ===================================================================================== data
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
        """(n_gt,) per-object IoU threshold ``min(0.5, wh / ((w+10)(h+10)))``, w/h with +1."""
        w = self.boxes[:, 2] - self.boxes[:, 0] + 1
        h = self.boxes[:, 3] - self.boxes[:, 1] + 1
        with np.errstate(divide='ignore', invalid='ignore'):
            thr = (w * h) / ((w + PIXEL_TOLERANCE) * (h + PIXEL_TOLERANCE))
        return np.minimum(thr, DEFAULT_IOU_THR)


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


def _load_json(path, what):
    path = Path(path)
    try:
        with open(path, 'r') as f:
            return json.load(f)
    except FileNotFoundError:
        raise VidDetError(f'{path}: {what} not found') from None
    except json.JSONDecodeError as e:
        raise VidDetError(f'{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})') from None
    except OSError as e:
        raise VidDetError(f'{path}: cannot read {what} ({e})') from None


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
    data = ann if isinstance(ann, dict) else _load_json(ann, 'annotation file')
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


# ===================================================================================== results I/O
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
    data = _load_json(path, 'results file')
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
    """Writes COCO result dicts as JSON (atomically); numpy scalars become plain numbers."""
    return atomic_write_json(path, [dict(image_id=int(r['image_id']), category_id=int(r['category_id']),
                                         bbox=[float(v) for v in r['bbox']], score=float(r['score']))
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


# ===================================================================================== motion IoU
@dataclass
class MotionIoU:
    """Per-object motion IoU of the ground truth.

    Attributes:
        values: (n_gt,) float64, aligned with :class:`GroundTruth` objects.
        all_values: every value of the source (the .mat's cells with an empty cell as one 0, or the
            computed values plus one 0 per frame without objects); ``empty_weight`` uses them.
        source: a label for reports: 'file: <path>' or 'computed from ground truth ...'.
    """

    values: np.ndarray
    all_values: np.ndarray
    source: str

    def empty_weight(self, lo: float, hi: float) -> float:
        """Share of ``all_values`` inside ``[lo, hi]`` (FGFA ``empty_weight``)."""
        v = self.all_values
        return float(((v >= lo) & (v <= hi)).sum()) / float(len(v)) if len(v) else 0.0


def read_motion_iou_mat(path) -> List[np.ndarray]:
    """Reads ``imagenet_vid_groundtruth_motion_iou.mat``: one float64 array per val frame.

    Cell i (0-based) belongs to global frame id i + 1; it holds one value per object in XML order;
    an empty cell reads as a single 0 (the original's reading, REFERENCE.md §9.2).

    Raises:
        VidDetError: if the file is missing, unreadable or has no ``motion_iou`` variable.
    """
    import scipy.io as sio
    path = Path(path)
    if not path.is_file():
        raise VidDetError(f'{path}: motion IoU file not found')
    try:
        m = sio.loadmat(str(path))
    except Exception as e:  # noqa: BLE001 - scipy raises several types for corrupt files
        raise VidDetError(f'{path}: cannot read as a MATLAB .mat file ({e})') from None
    if 'motion_iou' not in m:
        raise VidDetError(f'{path}: no "motion_iou" variable (found {sorted(k for k in m if not k.startswith("__"))})')
    cells = m['motion_iou']
    out = []
    for i in range(cells.shape[0]):
        c = np.asarray(cells[i][0], dtype=np.float64)
        if c.size == 0:
            out.append(np.zeros(max(len(c), 1)))  # the original: an empty row reads as 0
        else:
            out.append(c.reshape(-1))
    return out


def motion_iou_from_mat(path, gt: GroundTruth) -> MotionIoU:
    """Aligns the official .mat with the ground truth: objects of the frame with image id g take the
    values of cell g - 1 in order.

    Raises:
        VidDetError: if an image id has no cell or a frame's object count differs from its cell's,
            naming the file, the image id and both counts.
    """
    cells = read_motion_iou_mat(path)
    counts = np.bincount(gt.img_index, minlength=len(gt.image_ids))
    values = np.empty(len(gt.labels), np.float64)
    starts = np.concatenate(([0], np.cumsum(counts)))
    for k in np.flatnonzero(counts):
        gid = int(gt.image_ids[k])
        if not 1 <= gid <= len(cells):
            raise VidDetError(f'{path}: no motion IoU for image id {gid} (the file covers ids 1..{len(cells)}; '
                              'the image ids must be the global val frame ids)')
        c = cells[gid - 1]
        if len(c) != counts[k]:
            raise VidDetError(f'{path}: image id {gid} has {int(counts[k])} objects in the annotation file but '
                              f'{len(c)} motion IoU values')
        values[starts[k]:starts[k + 1]] = c
    source = f'file: {path}'
    if len(gt.image_ids) != len(cells):
        source += (f' (covers {len(cells)} frames, the annotation file has {len(gt.image_ids)}: valid only if its '
                   'image ids are global ImageNet VID val frame ids)')
    return MotionIoU(values=values, all_values=np.concatenate(cells) if cells else np.zeros(0), source=source)


def iou_plus1(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Element-wise devkit IoU of boxes ``a`` and ``b`` ((n, 4) x1, y1, x2, y2, +1 convention).

    Returns:
        (iou (n,), overlaps (n,) bool: iw > 0 and ih > 0); iou is 0 where they do not overlap.
    """
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1.0
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1.0
    ok = (iw > 0) & (ih > 0)
    inter = iw * ih
    ua = (a[:, 2] - a[:, 0] + 1.0) * (a[:, 3] - a[:, 1] + 1.0) + (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0) - inter
    with np.errstate(divide='ignore', invalid='ignore'):
        iou = np.where(ok, inter / ua, 0.0)
    return iou, ok


def compute_motion_iou(gt: GroundTruth, radius: int = MOTION_NEIGHBOURHOOD) -> MotionIoU:
    """Motion IoU from the ground truth itself (FGFA paper, §5: "the average IoU with its
    corresponding instances in the nearby frames (±10 frames)").

    For each object (an ``instance_id`` in a video at ``frame_id`` t), the mean devkit (+1) IoU of its
    box with the boxes of the same instance in frames t-radius..t+radius (t excluded) where the
    instance is annotated. An object without such a neighbour (or without instance/frame ids) gets
    0 (counted as fast, like the .mat's empty cells). The official .mat's exact recipe is not
    published; values computed here are labelled 'computed'.

    Returns:
        :class:`MotionIoU` whose ``all_values`` add one 0 per frame without objects (as the .mat).
    """
    n = len(gt.labels)
    vid = gt.video_ids[gt.img_index]
    fr = gt.frame_ids[gt.img_index]
    valid = (gt.instance_ids >= 0) & (fr >= 0)
    values = np.zeros(n, np.float64)
    if valid.any():
        # dense key (video, instance) -> contiguous index, then key = inst_index * stride + frame
        pairs = np.stack([vid[valid], gt.instance_ids[valid]], 1)
        _, inst_idx = np.unique(pairs, axis=0, return_inverse=True)
        inst_idx = inst_idx.reshape(-1)
        f = fr[valid]
        stride = int(f.max()) + 2 * radius + 2
        keys = inst_idx.astype(np.int64) * stride + f + radius
        order = np.argsort(keys, kind='stable')
        skeys = keys[order]
        sboxes = gt.boxes[valid][order]
        boxes = gt.boxes[valid]
        total = np.zeros(len(keys))
        count = np.zeros(len(keys))
        for d in range(-radius, radius + 1):
            if d == 0:
                continue
            tgt = keys + d
            pos = np.searchsorted(skeys, tgt)
            posc = np.minimum(pos, len(skeys) - 1)
            found = (pos < len(skeys)) & (skeys[posc] == tgt)
            if not found.any():
                continue
            iou, _ = iou_plus1(boxes[found], sboxes[posc[found]])
            total[found] += iou
            count[found] += 1
        v = np.zeros(len(keys))
        np.divide(total, count, out=v, where=count > 0)
        values[valid] = v
    n_empty = int((np.bincount(gt.img_index, minlength=len(gt.image_ids)) == 0).sum())
    return MotionIoU(values=values, all_values=np.concatenate([values, np.zeros(n_empty)]),
                     source=f'computed from ground truth (mean IoU with the same instance in frames t±{radius}; '
                            'FGFA paper definition, not the official .mat)')


# ===================================================================================== core
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
        plain: the official mAP curves (``imagenet_vid_eval.py``).
        motion: 'all', 'fast', 'medium', 'slow' -> curves of ``imagenet_vid_eval_motion.py``
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
        gt: ground truth (:func:`load_ground_truth`).
        det: detections (:func:`results_to_arrays`), original-image pixels.
        motion: per-object motion IoU (:func:`motion_iou_from_mat` / :func:`compute_motion_iou`).
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
    gw = gt.boxes[:, 2] - gt.boxes[:, 0] + 1
    gh = gt.boxes[:, 3] - gt.boxes[:, 1] + 1
    ig_area = (gw * gh < AREA_RANGE[0]) | (gw * gh > AREA_RANGE[1])
    dw = det.boxes[:, 2] - det.boxes[:, 0] + 1
    dh = det.boxes[:, 3] - det.boxes[:, 1] + 1
    det_out_area = (dw * dh < AREA_RANGE[0]) | (dw * dh > AREA_RANGE[1])
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


# ===================================================================================== reports
METRIC_KEYS = ('coco_ap50', 'vid_map', 'vid_map_slow', 'vid_map_medium', 'vid_map_fast')


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _plot_pr(path, title: str, curves: List[Tuple[str, np.ndarray, np.ndarray]], note: str = '') -> Path:
    """One PNG with a precision/recall curve per class (matplotlib Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, rec, prec in curves:
        ax.plot(rec, prec, linewidth=1.0, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel('recall')
    ax.set_ylabel('precision')
    ax.set_title(title + (f'\n{note}' if note else ''), fontsize=10)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=6, ncol=2, loc='lower left')
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    return atomic_write_bytes(path, buf.getvalue())


def format_ap_table(metrics: dict) -> str:
    """Per-class AP table (text, percentages) from a metrics dict of :func:`evaluate_results`."""
    cols = [('coco_ap50', 'COCO AP50'), ('vid_ap', 'VID AP'), ('vid_ap_slow', 'slow'),
            ('vid_ap_medium', 'medium'), ('vid_ap_fast', 'fast')]
    head = f'{"class":<16}{"objects":>9}' + ''.join(f'{t:>11}' for _, t in cols)
    lines = [head, '-' * len(head)]

    def fmt(v):
        return f'{100 * v:>11.2f}' if v is not None else f'{"-":>11}'
    omitted = 0
    for name, pc in metrics['per_class'].items():
        if pc['num_objects'] == 0 and all(pc.get(k) is None for k, _ in cols):
            omitted += 1
            continue
        lines.append(f'{name:<16}{pc["num_objects"]:>9d}' + ''.join(fmt(pc.get(k)) for k, _ in cols))
    lines.append('-' * len(head))
    tot = sum(pc['num_objects'] for pc in metrics['per_class'].values())
    mean_keys = ['coco_ap50', 'vid_map', 'vid_map_slow', 'vid_map_medium', 'vid_map_fast']
    lines.append(f'{"mean":<16}{tot:>9d}' + ''.join(fmt(metrics.get(k)) for k in mean_keys))
    if omitted:
        lines.append(f'({omitted} classes without ground truth omitted; they are left out of the means)')
    return '\n'.join(lines) + '\n'


def evaluate_results(results, ann_file, motion_iou=None, out_dir=None, devkit_rounding: bool = True,
                     coco: bool = True) -> dict:
    """Every VID metric of a set of detections: COCO AP50, official VID mAP, slow/medium/fast.

    Args:
        results: list of COCO result dicts ``{image_id, category_id, bbox [x, y, w, h], score}``
            in original-image pixels (MMTracking boxes converted with ``[x1, y1, x2-x1, y2-y1]``).
        ann_file: COCO-VID annotation JSON (e.g. ``imagenet_vid_val.json``).
        motion_iou: path of ``imagenet_vid_groundtruth_motion_iou.mat``; None computes the motion IoU
            from the ground truth (paper definition, see :func:`compute_motion_iou`) and labels it so.
        out_dir: if given, writes (atomically) ``results.json`` (COCO), ``detections_vid.txt``
            (devkit format), ``ap_table.txt``, ``metrics.json`` and ``pr_{coco_ap50,vid,vid_slow,
            vid_medium,vid_fast}.png``.
        devkit_rounding: quantise scores/boxes like the devkit's text file (see module docstring).
        coco: also run pycocotools (slow on the full val set: ~minutes).

    Returns:
        ``{"coco_ap50", "vid_map", "vid_map_slow", "vid_map_medium", "vid_map_fast",
        "vid_map_motion_all", "coco_stats" {12 named values}, "motion_iou_source", "num_images",
        "num_objects", "num_detections", "per_class": {name: {"num_objects", "coco_ap50", "vid_ap",
        "vid_ap_slow", "vid_ap_medium", "vid_ap_fast"}}}``; APs are fractions in [0, 1], None when
        undefined (no objects of a class, or no detections at all for ``coco_ap50``).

    Raises:
        VidDetError: malformed results, unknown image/category ids, unreadable annotation or
            motion-IoU file (messages name the file and entry).
    """
    validate_results(results)
    gt = load_ground_truth(ann_file)
    det = results_to_arrays(results, gt)
    if motion_iou is not None:
        mot = motion_iou_from_mat(motion_iou, gt)
    else:
        mot = compute_motion_iou(gt)
    ve = vid_eval(gt, det, mot, devkit_rounding=devkit_rounding, keep_curves=out_dir is not None)
    ce = None
    if coco:
        from viddet.evaluation.coco import coco_evaluate
        ce = coco_evaluate(results, ann_file)
    names = gt.class_names
    per_class = {}
    for k, n in enumerate(names):
        per_class[n] = dict(num_objects=int(ve.plain.npos[k]),
                            coco_ap50=None if ce is None else ce.per_class_ap50.get(n),
                            vid_ap=_nan_to_none(ve.plain.ap[k]),
                            vid_ap_slow=_nan_to_none(ve.motion['slow'].ap[k]),
                            vid_ap_medium=_nan_to_none(ve.motion['medium'].ap[k]),
                            vid_ap_fast=_nan_to_none(ve.motion['fast'].ap[k]))
    from viddet.evaluation.coco import COCO_STAT_NAMES
    metrics = dict(
        coco_ap50=None if ce is None or not len(det) else float(ce.ap50),
        vid_map=_nan_to_none(ve.map),
        vid_map_slow=_nan_to_none(ve.motion_map('slow')),
        vid_map_medium=_nan_to_none(ve.motion_map('medium')),
        vid_map_fast=_nan_to_none(ve.motion_map('fast')),
        vid_map_motion_all=_nan_to_none(ve.motion_map('all')),
        coco_stats=None if ce is None else {n: float(v) for n, v in zip(COCO_STAT_NAMES, ce.stats)},
        motion_iou_source=mot.source,
        num_images=int(len(gt.image_ids)), num_objects=int(len(gt.labels)), num_detections=int(len(det)),
        per_class=per_class)
    if out_dir is not None:
        out = Path(out_dir)
        write_coco_results(results, out / 'results.json')
        write_vid_txt(results, gt, out / 'detections_vid.txt')
        atomic_write_text(out / 'ap_table.txt', format_ap_table(metrics))
        atomic_write_json(out / 'metrics.json', metrics, indent=2)
        if ce is not None and ce.precision50 is not None:
            rthr = np.linspace(0, 1, 101)
            curves = [(n, rthr[ce.precision50[:, k] > -1], ce.precision50[:, k][ce.precision50[:, k] > -1])
                      for k, n in enumerate(names) if (ce.precision50[:, k] > -1).any()]
            _plot_pr(out / 'pr_coco_ap50.png', f'COCO AP@0.5 (pycocotools, 101-point): {100 * ce.ap50:.2f}', curves)
        for key, cur, label in [('vid', ve.plain, 'ImageNet VID mAP (devkit)')] + \
                [(f'vid_{m}', ve.motion[m], f'ImageNet VID mAP, {m} motion') for m in ('slow', 'medium', 'fast')]:
            curves = [(n, cur.rec[k], cur.prec[k]) for k, n in enumerate(names) if cur.rec[k] is not None]
            note = '' if key == 'vid' else f'motion IoU {mot.source}'
            _plot_pr(out / f'pr_{key}.png', f'{label}: {100 * cur.mean:.2f}', curves, note=note[:110])
    return metrics


def format_report(metrics: dict) -> str:
    """The labelled summary printed by ``viddet eval`` / ``viddet test``."""
    def pct(v):
        return 'n/a' if v is None else f'{100 * v:6.2f} %  ({v:.4f})'
    lines = [f'Evaluated {metrics["num_detections"]} detections on {metrics["num_images"]} frames '
             f'({metrics["num_objects"]} ground-truth objects)',
             f'  COCO box AP@50 (pycocotools, = MMTracking bbox_mAP_50): {pct(metrics["coco_ap50"])}',
             f'  ImageNet VID mAP@0.5 (official devkit rules):          {pct(metrics["vid_map"])}',
             f'  VID mAP by motion speed (FGFA motion IoU bins):',
             f'    slow   (motion IoU >= 0.9):          {pct(metrics["vid_map_slow"])}',
             f'    medium (0.7 <= motion IoU <= 0.9):   {pct(metrics["vid_map_medium"])}',
             f'    fast   (motion IoU <= 0.7):          {pct(metrics["vid_map_fast"])}',
             f'  motion IoU: {metrics["motion_iou_source"]}']
    return '\n'.join(lines)


def evaluate_and_report(results, ann_file, motion_iou=None, out_dir=None, json_path=None, **kwargs) -> dict:
    """:func:`evaluate_results`, then print :func:`format_report` and, if ``out_dir`` is given, the
    per-class table; write the metrics dict to ``json_path`` (atomically) when given.

    This is what ``viddet eval`` runs and what ``viddet test`` calls after inference.

    Returns:
        the metrics dict of :func:`evaluate_results`.
    """
    metrics = evaluate_results(results, ann_file, motion_iou=motion_iou, out_dir=out_dir, **kwargs)
    if out_dir is not None:
        print(format_ap_table(metrics))
    print(format_report(metrics))
    if out_dir is not None:
        print(f'  outputs written to {out_dir} (results.json, detections_vid.txt, ap_table.txt, metrics.json, pr_*.png)')
    if json_path is not None:
        atomic_write_json(json_path, metrics, indent=2)
        print(f'  metrics written to {json_path}')
    return metrics
