"""Per-frame time of the detector's two NMS calls, plain (``batched_nms(...)[:max_keep]``,
torchvision's kernel) vs the early-stopping fast path (:mod:`viddet.speedups.nms`), on the real
inputs of the parity clip.

The inputs are captured from one offline run of a method (default DFF, R-50, the parity checkpoint
``make_checkpoint.py --seed 0``) over ``../shared/parity/clips/vid7010_first12``: every call of
``RPNHead.nms`` (~6000 decoded anchors, IoU 0.7, keep 300) and ``RoIHead.nms`` (every (box, class)
pair scoring > 1e-4, class-wise IoU 0.5, keep 100). Each call is then timed both ways (median of
``--repeat`` runs) at ``--threads`` threads, and the kept indices are checked to be identical.
Prints, per call kind, the boxes in, the boxes the fast path visits (up to its last kept one), and
the milliseconds per frame (sum over the frames / frames).

    python benchmarks/bench_nms.py [--method dff] [--threads 1] [--repeat 5] [--sets /tmp/nms_sets.pt]

``--sets FILE`` keeps the captured inputs: loaded when the file exists, else captured and saved.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from viddet.models.boxes import batched_nms
from viddet.models.detector import RoIHead, RPNHead
from viddet.speedups.nms import first_kept

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'parity'
CHECKPOINT_KEYS = {'single': 'dff_r50', 'dff': 'dff_r50', 'fgfa': 'fgfa_r50', 'selsa': 'selsa_r50', 'troi': 'troi_r50'}


def capture(method: str, ckpt_dir: Path) -> dict:
    """{'rpn': [...], 'rcnn': [...]}: the (boxes, scores, idxs, iou_threshold, max_keep) of every
    NMS call of one offline run over the parity clip, and 'frames': the number of frames."""
    from viddet.checkpoints.loading import load_model
    from viddet.data.image_sources import FolderSource
    from viddet.engine.video import run_video
    model = load_model(str(ckpt_dir / f'{CHECKPOINT_KEYS[method]}_seed0.pth'), method=method).model
    sets = {'rpn': [], 'rcnn': []}
    for head in model.modules():
        if isinstance(head, (RPNHead, RoIHead)):
            calls = sets['rpn' if isinstance(head, RPNHead) else 'rcnn']

            def record(boxes, scores, idxs, iou, max_keep, head=head, calls=calls):
                calls.append((boxes.clone(), scores.clone(), idxs.clone(), iou, max_keep))
                return type(head).nms(head, boxes, scores, idxs, iou, max_keep)
            head.nms = record
    with FolderSource(str(SHARED / 'clips' / 'vid7010_first12')) as source:
        sets['frames'] = sum(1 for _ in run_video(model, source, mode='offline'))
    return sets


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--method', default='dff', choices=sorted(CHECKPOINT_KEYS))
    ap.add_argument('--checkpoints', default='/tmp/viddet_parity_ckpt', type=Path)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--repeat', type=int, default=5)
    ap.add_argument('--sets', type=Path, default=None, help='captured inputs (loaded if present, else saved)')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sets is not None and args.sets.exists():
        sets = torch.load(args.sets)
    else:
        sets = capture(args.method, args.checkpoints)
        if args.sets is not None:
            torch.save(sets, args.sets)
    frames = sets['frames']
    print(f'{args.method}, {frames} frames, {args.threads} thread(s), median of {args.repeat}')
    total_plain = total_fast = 0.0
    for kind in ('rpn', 'rcnn'):
        plain_s = fast_s = 0.0
        sizes, kept, visited = [], [], []
        for boxes, scores, idxs, iou, max_keep in sets[kind]:
            expected = batched_nms(boxes, scores, idxs, iou)[:max_keep]
            got = first_kept(boxes, scores, idxs, iou, max_keep)
            assert got is not None and torch.equal(got, expected), f'{kind}: fast != plain'
            sizes.append(boxes.shape[0])
            kept.append(len(expected))
            rank = torch.empty_like(idxs).index_put_((scores.sort(descending=True)[1],), torch.arange(len(idxs)))
            visited.append(int(rank[got].max()) + 1 if len(got) == max_keep else len(idxs))
            plain_s += median_seconds(lambda: batched_nms(boxes, scores, idxs, iou)[:max_keep], args.repeat)
            fast_s += median_seconds(lambda: first_kept(boxes, scores, idxs, iou, max_keep), args.repeat)
        total_plain += plain_s
        total_fast += fast_s
        print(f'{kind:5s} {len(sizes)} calls, boxes in {min(sizes)}-{max(sizes)} (mean {statistics.mean(sizes):.0f}), '
              f'kept {min(kept)}-{max(kept)}, fast path visits {statistics.mean(visited):.0f} on average: '
              f'plain {1e3 * plain_s / frames:.1f} ms/frame, '
              f'fast {1e3 * fast_s / frames:.1f} ms/frame ({plain_s / fast_s:.1f}x), identical')
    print(f'both  plain {1e3 * total_plain / frames:.1f} ms/frame, fast {1e3 * total_fast / frames:.1f} ms/frame')


if __name__ == '__main__':
    main()
