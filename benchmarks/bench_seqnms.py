"""Speed of Seq-NMS (viddet.linking.seqnms) on a synthetic set the size of ImageNet VID val.

176,126 frames in 555 videos. Each video has 1-3 moving objects (as in bench_eval.py); every frame
holds boxes like those FGFA's tester hands to Seq-NMS (``fgfa_rfcn/core/tester.py`` with
``TEST.SEQ_NMS``: per class every RoI scoring > 1e-3, no per-frame NMS, i.e. up to 300 per class):
per visible object a cluster of 60 jittered proposals of its class (scores rising with their IoU to
the object, some frames missed) and the same proposals with lower scores in one confusable class, a
few persistent background regions, and random background boxes in random classes, topped up to
``--boxes`` (300) per frame; boxes scoring <= 1e-3 dropped. ``--nms`` first applies MMTracking's
test-time per-class NMS (IoU 0.5, 100 boxes per frame), as viddet's detector outputs have. Times
the whole set (one video at a time, as the CLI would) and reports seconds in total and per frame.

    python benchmarks/bench_seqnms.py [--frames 176126] [--videos 555] [--boxes 300] [--limit-videos N]
    python benchmarks/bench_seqnms.py --nms           # after MMTracking's per-frame NMS (viddet's outputs)
    python benchmarks/bench_seqnms.py --identity 8    # ID switches / MOTA / IDF1: online vs Seq-NMS
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from viddet.linking.seqnms import seq_nms


def _iou(a, b):
    w = np.clip(np.minimum(a[:, 2], b[2]) - np.maximum(a[:, 0], b[0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[3]) - np.maximum(a[:, 1], b[1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def synthetic_video(rng, length: int, boxes_per_frame: int = 300, cluster: int = 60, with_gt: bool = False):
    """One video's per-frame (boxes (n, 4) float64, scores (n,), labels (n,)) lists, pixels, and with
    ``with_gt`` the ground truth per frame as (boxes (m, 4), instance ids (m,), labels (m,))."""
    tracks = []
    for _ in range(int(rng.integers(1, 4))):
        s = int(rng.integers(0, max(1, length // 3)))
        e = int(rng.integers(min(length, s + max(1, length // 2)), length + 1))
        speed = rng.choice([0.3, 2.0, 8.0])
        xy = np.cumsum(rng.normal(0, speed, (e - s, 2)), 0) + rng.uniform(100, 600, 2)
        wh = rng.uniform(40, 400, 2) * np.exp(np.cumsum(rng.normal(0, 0.01, (e - s, 2)), 0))
        cls = int(rng.integers(0, 30))
        tracks.append((s, e, np.concatenate([xy, xy + wh], 1), cls, int((cls + rng.integers(1, 30)) % 30)))
    regions = rng.uniform(0, 900, (int(rng.integers(3, 10)), 2))
    regions = np.concatenate([regions, regions + rng.uniform(30, 300, regions.shape)], 1)
    region_cls = rng.integers(0, 30, len(regions))
    out_b, out_s, out_l, gts = [], [], [], []
    for t in range(length):
        bs, ss, ls = [], [], []
        gts.append(([], [], []))
        for k, (s, e, gt, cls, conf) in enumerate(tracks):
            if not s <= t < e:
                continue
            g = gt[t - s]
            gts[-1][0].append(g)
            gts[-1][1].append(k)
            gts[-1][2].append(cls)
            wh = np.tile(g[2:] - g[:2], 2)
            b = g + rng.normal(0, 0.12, (cluster, 4)) * wh
            b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 2)
            quality = rng.beta(5, 1.5) if rng.random() > 0.1 else rng.beta(1, 8)  # some frames missed
            sc = quality * _iou(b, g) ** 2
            bs += [b, b]
            ss += [sc, sc * rng.uniform(0.02, 0.3)]
            ls += [np.full(cluster, cls), np.full(cluster, conf)]
        rb = regions + rng.normal(0, 3, regions.shape)
        bs.append(rb)
        ss.append(rng.beta(1, 12, len(rb)))
        ls.append(region_cls)
        n_rand = max(0, boxes_per_frame - sum(len(x) for x in ss))
        xy = rng.uniform(0, 1100, (n_rand, 2))
        bs.append(np.concatenate([xy, xy + rng.uniform(10, 300, (n_rand, 2))], 1))
        ss.append(rng.beta(1, 25, n_rand))
        ls.append(rng.integers(0, 30, n_rand))
        b, sc, lab = np.concatenate(bs), np.concatenate(ss), np.concatenate(ls)
        keep = np.flatnonzero(sc > 1e-3)                      # FGFA's per-class score threshold
        keep = keep[np.argsort(-sc[keep], kind='stable')[:boxes_per_frame]]  # max_per_image
        out_b.append(np.round(b[keep], 1))
        out_s.append(sc[keep])
        out_l.append(lab[keep].astype(np.int64))
    if with_gt:
        gts = [(np.array(b).reshape(-1, 4), np.array(i, dtype=np.int64), np.array(c, dtype=np.int64)) for b, i, c in gts]
        return out_b, out_s, out_l, gts
    return out_b, out_s, out_l


def mmtracking_nms(boxes, scores, labels, iou: float = 0.5, max_per_img: int = 100):
    """Per-class NMS and the top-``max_per_img`` boxes of each frame (MMTracking's rcnn test_cfg)."""
    import torch
    from torchvision.ops import batched_nms
    out = ([], [], [])
    for b, s, lab in zip(boxes, scores, labels):
        keep = batched_nms(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(lab), iou)[:max_per_img]
        keep = np.sort(keep.numpy())
        for o, x in zip(out, (b, s, lab)):
            o.append(x[keep])
    return out


def identity_check(lengths, rng, boxes_per_frame: int, score_thr: float = 0.5):
    """ID switches / MOTA / IDF1 of the online tracker and of Seq-NMS tubes on some synthetic videos
    (hypotheses: boxes scoring >= score_thr), and the time per frame. The inputs first go through the
    per-class NMS (IoU 0.5) and the 100-box limit of MMTracking's test configs, like viddet's
    detector outputs; Seq-NMS is also run on the raw FGFA-style input ('seqnms raw')."""
    import torch

    from viddet.evaluation.identity import IdentityMetrics, identity_metrics
    from viddet.linking.link import link_video
    from viddet.structures import Detections
    from viddet.linking.tracker import IoUTracker
    res = {m: IdentityMetrics() for m in ('online', 'online+motion', 'seqnms', 'seqnms raw')}
    secs = {m: 0.0 for m in res}
    for length in lengths:
        b, s, lab, gts = synthetic_video(rng, int(length), boxes_per_frame, with_gt=True)
        raw = [Detections(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(z)) for x, y, z in zip(b, s, lab)]
        dets = [Detections(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(z))
                for x, y, z in zip(*mmtracking_nms(b, s, lab))]
        gt = [Detections(torch.from_numpy(x), torch.ones(len(i)), torch.from_numpy(c), torch.from_numpy(i))
              for x, i, c in gts]
        for m in res:
            t = time.perf_counter()
            out = link_video(raw if m == 'seqnms raw' else dets, 'seqnms' if m.startswith('seqnms') else 'online',
                             tracker=IoUTracker(motion=m.endswith('motion')))
            secs[m] += time.perf_counter() - t
            res[m] = res[m] + identity_metrics(gt, out, min_score=score_thr)
    n = int(sum(lengths))
    for m, r in res.items():
        print(f'{m:<14} ID switches {r.id_switches:5d}  MOTA {r.mota:.3f}  IDF1 {r.idf1:.3f}  '
              f'(matches {r.matches}, misses {r.misses}, FP {r.false_positives}; {1e3 * secs[m] / n:.2f} ms/frame)')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--frames', type=int, default=176126)
    ap.add_argument('--videos', type=int, default=555)
    ap.add_argument('--boxes', type=int, default=300, help='boxes per frame (all classes)')
    ap.add_argument('--limit-videos', type=int, default=0, help='time only the first N videos')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--nms', action='store_true',
                    help="first MMTracking's test-time per-class NMS (IoU 0.5) and 100 boxes per frame, "
                         "like viddet's detector outputs")
    ap.add_argument('--identity', type=int, default=0, metavar='N',
                    help='instead: identity metrics of online tracking vs Seq-NMS on the first N videos')
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    cuts = np.sort(rng.choice(np.arange(1, args.frames), args.videos - 1, replace=False))
    lengths = np.diff(np.concatenate(([0], cuts, [args.frames])))
    if args.limit_videos:
        lengths = lengths[:args.limit_videos]
    if args.identity:
        identity_check(lengths[:args.identity], rng, args.boxes)
        return
    gen = link = cpu = 0.0
    n_frames = n_in = n_kept = n_tubes = 0
    for i, length in enumerate(lengths):
        t = time.perf_counter()
        b, s, lab = synthetic_video(rng, int(length), args.boxes)
        if args.nms:
            b, s, lab = mmtracking_nms(b, s, lab)
        gen += time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        keep, scores, tubes = seq_nms(b, s, lab)
        link += time.perf_counter() - t
        cpu += time.process_time() - c
        n_frames += int(length)
        n_in += sum(len(x) for x in s)
        n_kept += sum(len(x) for x in keep)
        n_tubes += len(np.unique(np.concatenate(tubes))) if n_kept else 0
        if (i + 1) % 50 == 0:
            print(f'{i + 1} videos, {n_frames} frames: Seq-NMS {link:.1f} s so far')
    print(f'{len(lengths)} videos, {n_frames} frames, {n_in} boxes in ({n_in / n_frames:.0f}/frame), '
          f'{n_kept} kept, {n_tubes} tubes (generation {gen:.1f} s)')
    print(f'Seq-NMS total {link:.1f} s = {1e3 * link / n_frames:.2f} ms per frame '
          f'(process CPU time {cpu:.1f} s = {1e3 * cpu / n_frames:.2f} ms per frame)')


if __name__ == '__main__':
    main()
