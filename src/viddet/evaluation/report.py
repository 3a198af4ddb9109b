"""What ``viddet eval`` and ``viddet test`` report: every metric of a set of detections, the printed
summary and per-class table, ``metrics.json`` and precision/recall plots.

Metrics: COCO AP50 as MMTracking reports it (:mod:`viddet.evaluation.coco`), the official ImageNet
VID mAP and its slow / medium / fast breakdown (:mod:`viddet.evaluation.vid`, motion IoU from
:mod:`viddet.evaluation.motion`). Files: :mod:`viddet.evaluation.io`.
"""
from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path
from typing import List, Tuple

import numpy as np

from viddet.evaluation.coco import COCO_STAT_NAMES, coco_evaluate
from viddet.evaluation.io import load_ground_truth, results_to_arrays, validate_results, write_coco_results, write_vid_txt
from viddet.evaluation.motion import compute_motion_iou, motion_iou_from_mat
from viddet.evaluation.vid import vid_eval
from viddet.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

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
    buf = BytesIO()
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
    lines.append(f'{"mean":<16}{tot:>9d}' + ''.join(fmt(metrics.get(k)) for k in METRIC_KEYS))
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
            from the ground truth (paper definition, see
            :func:`viddet.evaluation.motion.compute_motion_iou`) and labels it so.
        out_dir: if given, writes (atomically) ``results.json`` (COCO), ``detections_vid.txt``
            (devkit format), ``ap_table.txt``, ``metrics.json`` and ``pr_{coco_ap50,vid,vid_slow,
            vid_medium,vid_fast}.png``.
        devkit_rounding: quantise scores/boxes like the devkit's text file (see
            :mod:`viddet.evaluation.vid`).
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
    ce = coco_evaluate(results, ann_file) if coco else None
    names = gt.class_names
    per_class = {}
    for k, n in enumerate(names):
        per_class[n] = dict(num_objects=int(ve.plain.npos[k]),
                            coco_ap50=None if ce is None else ce.per_class_ap50.get(n),
                            vid_ap=_nan_to_none(ve.plain.ap[k]),
                            vid_ap_slow=_nan_to_none(ve.motion['slow'].ap[k]),
                            vid_ap_medium=_nan_to_none(ve.motion['medium'].ap[k]),
                            vid_ap_fast=_nan_to_none(ve.motion['fast'].ap[k]))
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
             '  VID mAP by motion speed (FGFA motion IoU bins):',
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
