"""Linking saved detections: a COCO results file (``viddet test``'s ``results.json``) grouped into
videos by its annotation file, linked video by video (:func:`viddet.linking.link.link_video`), and the
identity quality of linked results against the annotations' instance ids
(:mod:`viddet.evaluation.identity`). What ``viddet eval --link``, ``viddet test --link`` and
``benchmarks/link_eval.py`` run.

Videos and frame order come from the annotation file, as in ``viddet test``
(:func:`viddet.engine.evaluate.load_videos`: images grouped by ``video_id``, sorted by
``frame_id``; images without a video are one-frame videos).

Frames without detections. A COCO results file lists detections, so a frame without any entry is
either a frame the detector found nothing in or a frame that was never run (a partial run, a file of
other frames). Linking joins consecutive frames, so it cannot tell the two apart: by default a
frame of the annotation file without any entry is an error naming the video and the frame;
``allow_empty=True`` (``--allow-empty-frames``) treats such frames as empty (tubes and tracks
then break there).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np
import torch

from viddet.engine.evaluate import coco_results, load_videos
from viddet.errors import VidDetError
from viddet.evaluation.identity import IdentityMetrics, identity_metrics
from viddet.evaluation.io import load_ground_truth
from viddet.fileio import atomic_write_json, read_json
from viddet.linking.link import LINK_MODES, link_video
from viddet.structures import Detections

IDENTITY_MIN_SCORE = 0.5
"""Linked boxes scoring below this are not counted as tracked objects in the identity metrics (the
demo's drawing threshold and the online tracker's start score)."""


def _frame_detections(entries: List[dict], label_of: Dict[int, int]) -> Detections:
    """COCO result entries of one frame -> :class:`Detections` (labels = category positions)."""
    if not entries:
        return Detections.empty()
    b = torch.tensor([e['bbox'] for e in entries], dtype=torch.float64)
    boxes = torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1).float()
    return Detections(boxes, torch.tensor([float(e['score']) for e in entries]),
                      torch.tensor([label_of[e['category_id']] for e in entries], dtype=torch.int64))


def link_results(results: List[dict], ann_file, mode: str, *, where: str = '<results>',
                 allow_empty: bool = False, **link_options) -> List[dict]:
    """Links the detections of a COCO results list video by video.

    Args:
        results: COCO result dicts ``{image_id, category_id, bbox [x, y, w, h], score}``, pixels
            (validated, e.g. by :func:`viddet.evaluation.io.load_results`).
        ann_file: the COCO-VID annotation file the results are for (videos, frame order, categories).
        mode: ``seqnms``, ``online`` or ``none`` (returns ``results`` unchanged).
        where: the results file's name, for messages.
        allow_empty: frames without any entry are empty frames (module docstring); default: an error.
        link_options: passed to :func:`viddet.linking.link.link_video` (``rescore``, ``frame_nms_iou``, ...).

    Returns:
        The linked results, video by video in annotation order, each with a ``track_id``.

    Raises:
        VidDetError: an unknown mode; an entry whose image or category is not in the annotation file
            (naming the entry); a frame without entries (naming the video, frame and file, and how
            many there are) unless ``allow_empty``.
    """
    if mode not in LINK_MODES:
        raise VidDetError(f'{where}: unknown link mode {mode!r}; expected one of {", ".join(LINK_MODES)}')
    if mode == 'none':
        return results
    videos, categories = load_videos(ann_file)
    cat_ids = [c['id'] for c in categories]
    label_of = {c: k for k, c in enumerate(cat_ids)}
    by_image: Dict[int, List[dict]] = defaultdict(list)
    known = {im['id'] for _, imgs in videos for im in imgs}
    for i, r in enumerate(results):
        if r['image_id'] not in known:
            raise VidDetError(f'{where}: entry {i} has image_id {r["image_id"]}, which is not in the annotation '
                              f'file {ann_file}')
        if r['category_id'] not in label_of:
            raise VidDetError(f'{where}: entry {i} has category_id {r["category_id"]}, which is not a category '
                              f'of {ann_file}')
        by_image[r['image_id']].append(r)
    missing = [(name, im) for name, imgs in videos for im in imgs if im['id'] not in by_image]
    if missing and not allow_empty:
        name, im = missing[0]
        raise VidDetError(
            f'{where}: video {name}, frame {im.get("frame_id", 0)} ({im["file_name"]}, image id {im["id"]}) has no '
            f'detections, and linking needs every frame of a video ({len(missing)} of {len(known)} frames of '
            f'{ann_file} have none: results of other frames or of a partial run?). If the detector really '
            f'found nothing there, pass --allow-empty-frames to link them as empty frames')
    out = []
    for name, imgs in videos:
        frames = [_frame_detections(by_image.get(im['id'], []), label_of) for im in imgs]
        for det, im in zip(link_video(frames, mode, where=f'{where}, video {name}', **link_options), imgs):
            out.extend(coco_results(det, im['id'], cat_ids))
    return out


def identity_of_results(results: List[dict], ann_file,
                        min_score: float = IDENTITY_MIN_SCORE) -> Optional[IdentityMetrics]:
    """ID switches, MOTA and IDF1 of linked results (entries with ``track_id``) against the
    annotation file's ``instance_id`` tracks, summed over the videos
    (:func:`viddet.evaluation.identity.identity_metrics`, class-aware, IoU 0.5, boxes scoring
    >= ``min_score``; frames without entries count as empty).

    Returns:
        The metrics, or None when the results carry no ``track_id`` or the annotations no
        ``instance_id``.
    """
    if not results or not all('track_id' in r for r in results):
        return None
    gt = load_ground_truth(ann_file)
    if not (gt.instance_ids >= 0).any():
        return None
    videos, categories = load_videos(ann_file)
    label_of = {c['id']: k for k, c in enumerate(categories)}
    index_of = {int(i): k for k, i in enumerate(gt.image_ids)}
    by_image: Dict[int, List[dict]] = defaultdict(list)
    for r in results:
        by_image[r['image_id']].append(r)
    total = IdentityMetrics()
    for _, imgs in videos:
        truth, pred = [], []
        for im in imgs:
            j = index_of[im['id']]
            k = slice(*np.searchsorted(gt.img_index, [j, j + 1]))    # img_index is sorted
            truth.append(Detections(torch.as_tensor(gt.boxes[k], dtype=torch.float32),
                                    torch.ones(k.stop - k.start), torch.as_tensor(gt.labels[k]),
                                    torch.as_tensor(gt.instance_ids[k])))
            entries = by_image.get(im['id'], [])
            det = _frame_detections(entries, label_of)
            det.track_ids = torch.tensor([int(e['track_id']) for e in entries], dtype=torch.int64)
            pred.append(det)
        total = total + identity_metrics(truth, pred, min_score=min_score)
    return total


def format_identity(m: IdentityMetrics, min_score: float = IDENTITY_MIN_SCORE) -> str:
    """The identity summary printed by ``viddet eval`` / ``viddet test`` with ``--link``."""
    def pct(v):
        return 'n/a' if v != v else f'{100 * v:.2f} %'
    return (f'  Identity (tracked boxes scoring >= {min_score:g} vs the annotations\' instance ids, IoU 0.5):\n'
            f'    ID switches {m.id_switches}, MOTA {pct(m.mota)}, IDF1 {pct(m.idf1)}  '
            f'({m.num_gt} ground-truth boxes, {m.num_pred} tracked boxes, {m.matches} matched)')


def report_identity(results: List[dict], ann_file, json_path=None) -> Optional[IdentityMetrics]:
    """Prints :func:`format_identity` of :func:`identity_of_results` (a note when there is nothing
    to score) and adds it as ``"identity"`` to the metrics JSON at ``json_path`` when given."""
    m = identity_of_results(results, ann_file)
    if m is None:
        print('  Identity: not scored (the results have no track ids or the annotations no instance ids)')
        return None
    print(format_identity(m))
    if json_path is not None:
        metrics = read_json(json_path, 'metrics file')
        metrics['identity'] = {**{k: None if v != v else v for k, v in m.as_dict().items()},
                               'min_score': IDENTITY_MIN_SCORE}
        atomic_write_json(json_path, metrics, indent=2)
    return m
