"""Motion IoU of the ground-truth objects and the slow / medium / fast bins of the FGFA paper.

The motion IoU of an object is "the average IoU with its corresponding instances in the nearby
frames (+-10 frames)" (Zhu et al., Flow-Guided Feature Aggregation for Video Object Detection,
ICCV 2017, section 5). The official values ship as ``imagenet_vid_groundtruth_motion_iou.mat`` in
FGFA's ``lib/dataset/`` (msracver/Flow-Guided-Feature-Aggregation); how they were computed is not
published, so :func:`compute_motion_iou` (the paper's definition, used when no file is given)
approximates them and labels its values as computed.

Bins (:data:`MOTION_RANGES`, FGFA's ``lib/dataset/imagenet_vid.py`` ``do_python_eval_gen``):
``fast [0, 0.7]``, ``medium [0.7, 0.9]``, ``slow [0.9, 1]``, bounds inclusive, so an object whose
motion IoU is exactly 0.7 or 0.9 counts in two bins. How a bin is scored is in
:func:`viddet.evaluation.vid.vid_eval`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

from viddet.errors import VidDetError
from viddet.evaluation.io import GroundTruth
from viddet.evaluation.iou import iou_plus1

MOTION_RANGES = {'all': (0.0, 1.0), 'fast': (0.0, 0.7), 'medium': (0.7, 0.9), 'slow': (0.9, 1.0)}
"""FGFA ``motion_ranges`` (inclusive bounds); 'all' is the full range."""
MOTION_NEIGHBOURHOOD = 10
"""Frames on each side used by :func:`compute_motion_iou` (FGFA paper: +-10 frames)."""


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
        """Share of ``all_values`` inside ``[lo, hi]`` (``empty_weight`` of FGFA's ``vid_eval_motion``:
        the false-positive weight of an unmatched detection in a frame without ground truth)."""
        v = self.all_values
        return float(((v >= lo) & (v <= hi)).sum()) / float(len(v)) if len(v) else 0.0


def read_motion_iou_mat(path) -> List[np.ndarray]:
    """Reads ``imagenet_vid_groundtruth_motion_iou.mat``: one float64 array per val frame.

    Cell i (0-based) belongs to global frame id i + 1; it holds one value per object in XML order;
    an empty cell reads as a single 0, as FGFA's ``vid_eval_motion`` reads it (so it counts as
    fast and enters :meth:`MotionIoU.empty_weight`).

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

