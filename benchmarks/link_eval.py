"""AP and identity quality of a results file with and without each linking mode.

Given a COCO results file (e.g. ``viddet test``'s ``<out-dir>/results.json``, unlinked) and its
COCO-VID annotation file, links the detections video by video with each mode
(:func:`viddet.engine.link_results.link_results`: ``none``, ``seqnms``, ``online``), and reports
for each: COCO AP50 (MMTracking's metric), the ImageNet VID mAP with slow / medium / fast, the
seconds linking took per frame, and for the linked modes the identity quality against the
annotations' instance ids (ID switches, MOTA, IDF1 of the boxes scoring >= 0.5;
:func:`viddet.engine.link_results.identity_of_results`).

    python benchmarks/link_eval.py work_dirs/test/results.json --ann data/mini_vid/annotations/val.json
    python benchmarks/link_eval.py results.json --ann ann.json --modes none seqnms --frame-nms 0.3 --json link.json
"""
from __future__ import annotations

import argparse
import sys
import time

from viddet.engine.evaluate import load_videos
from viddet.engine.link_results import IDENTITY_MIN_SCORE, identity_of_results, link_results
from viddet.evaluation.io import load_results
from viddet.evaluation.report import evaluate_results
from viddet.fileio import atomic_write_json
from viddet.linking.link import LINK_MODES

COLUMNS = [('coco_ap50', 'AP50'), ('vid_map', 'VID mAP'), ('vid_map_slow', 'slow'), ('vid_map_medium', 'medium'),
           ('vid_map_fast', 'fast')]


def evaluate_modes(results, ann, modes=LINK_MODES, *, coco=True, motion_iou=None, allow_empty=False,
                   frame_nms_iou=None, where='<results>', identity_min_score=IDENTITY_MIN_SCORE,
                   tracker=None) -> dict:
    """{mode: {metric: value, 'link_s_per_frame', 'identity' (dict or None)}} for each link mode."""
    num_frames = sum(len(imgs) for _, imgs in load_videos(ann)[0])
    out = {}
    for mode in modes:
        options = {'frame_nms_iou': frame_nms_iou} if mode == 'seqnms' and frame_nms_iou is not None else {}
        if mode == 'online' and tracker is not None:
            options['tracker'] = tracker
        t0 = time.perf_counter()
        linked = link_results(results, ann, mode, where=where, allow_empty=allow_empty, **options)
        seconds = time.perf_counter() - t0
        metrics = evaluate_results(linked, ann, motion_iou=motion_iou, coco=coco)
        identity = identity_of_results(linked, ann, min_score=identity_min_score) if mode != 'none' else None
        out[mode] = {**{k: metrics[k] for k, _ in COLUMNS}, 'num_detections': metrics['num_detections'],
                     'link_s_per_frame': seconds / max(num_frames, 1),
                     'identity': None if identity is None else
                     {k: None if v != v else v for k, v in identity.as_dict().items()}}
    return out


def format_table(table: dict, identity_min_score: float = IDENTITY_MIN_SCORE) -> str:
    def pct(v):
        return f'{"-":>8}' if v is None else f' {100 * v:7.2f}'
    head = f'{"link":<8}' + ''.join(f'{t:>8}' for _, t in COLUMNS) + f'{"dets":>9}{"s/frame":>10}' \
           + f'{"IDsw":>7}{"MOTA":>8}{"IDF1":>8}'
    lines = [head, '-' * len(head)]
    for mode, m in table.items():
        ident = m['identity']
        idcols = (f'{ident["id_switches"]:>7d}{pct(ident["mota"])}{pct(ident["idf1"])}' if ident
                  else f'{"-":>7}{"-":>8}{"-":>8}')
        lines.append(f'{mode:<8}' + ''.join(pct(m[k]) for k, _ in COLUMNS) + f'{m["num_detections"]:>9d}'
                     + f'{m["link_s_per_frame"]:>10.5f}' + idcols)
    lines.append(f'(AP in %; identity of the linked boxes scoring >= {identity_min_score:g} against the '
                 f'annotations\' instance ids)')
    return '\n'.join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('results', help='COCO results JSON (unlinked detections)')
    ap.add_argument('--ann', required=True, help='the COCO-VID annotation file the results are for')
    ap.add_argument('--modes', nargs='+', choices=LINK_MODES, default=['none', 'seqnms', 'online'])
    ap.add_argument('--motion-iou', default=None, help='official motion IoU .mat (else computed)')
    ap.add_argument('--no-coco', action='store_true', help='skip pycocotools (AP50)')
    ap.add_argument('--frame-nms', type=float, default=None, metavar='IOU',
                    help="Seq-NMS: FGFA's per-frame NMS afterwards at this IoU (FGFA uses 0.3)")
    ap.add_argument('--allow-empty-frames', action='store_true',
                    help='annotated frames without detections are empty frames (else an error)')
    ap.add_argument('--identity-min-score', type=float, default=IDENTITY_MIN_SCORE, metavar='S',
                    help=f'identity metrics of the linked boxes scoring >= S (default {IDENTITY_MIN_SCORE:g})')
    ap.add_argument('--track-start', type=float, default=None, metavar='S',
                    help='online: an unmatched detection scoring >= S starts a track (IoUTracker default 0.5)')
    ap.add_argument('--track-match', type=float, default=None, metavar='S',
                    help='online: detections scoring < S are not tracked (IoUTracker default 0.1)')
    ap.add_argument('--json', default=None, help='write the table as JSON here')
    args = ap.parse_args(argv)
    from viddet.errors import VidDetError
    from viddet.linking.tracker import IoUTracker
    tracker = None
    try:
        if args.track_start is not None or args.track_match is not None:
            kw = {k: v for k, v in (('start_score', args.track_start), ('match_score', args.track_match)) if v is not None}
            tracker = IoUTracker(**kw)
        table = evaluate_modes(load_results(args.results), args.ann, args.modes, coco=not args.no_coco,
                               motion_iou=args.motion_iou, allow_empty=args.allow_empty_frames,
                               frame_nms_iou=args.frame_nms, where=args.results,
                               identity_min_score=args.identity_min_score, tracker=tracker)
    except VidDetError as e:
        print(f'link_eval: error: {e}', file=sys.stderr)
        return 2
    print(format_table(table, args.identity_min_score))
    if args.json:
        atomic_write_json(args.json, {'results': args.results, 'annotations': args.ann,
                                      'identity_min_score': args.identity_min_score,
                                      'tracker': None if tracker is None else
                                      {'start_score': tracker.start_score, 'match_score': tracker.match_score},
                                      'modes': table}, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
