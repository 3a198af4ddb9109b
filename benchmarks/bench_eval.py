"""Speed of the evaluator on a synthetic set the size of ImageNet VID val.

176,126 frames in 555 videos, ~1.6 tracked objects per frame in 30 classes, ~1.5 M detections
(jittered copies of the objects with some wrong classes, plus background boxes). Times the official
VID mAP + motion bins (vectorised numpy) and, unless ``--no-coco``, MMTracking's pycocotools AP50.

    python benchmarks/bench_eval.py [--frames 176126] [--dets 1500000] [--no-coco]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from viddet import VID_CLASSES
from viddet.evaluation.io import load_ground_truth, results_to_arrays, validate_results
from viddet.evaluation.motion import compute_motion_iou
from viddet.evaluation.vid import vid_eval


def synthetic(num_frames: int, num_videos: int, num_dets: int, seed: int = 0):
    """COCO-VID ground-truth dict and COCO results list (plain Python, like a loaded JSON)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, num_frames), num_videos - 1, replace=False))
    lengths = np.diff(np.concatenate(([0], cuts, [num_frames])))
    ann = dict(categories=[dict(id=i + 1, name=n) for i, n in enumerate(VID_CLASSES)], videos=[], images=[],
               annotations=[])
    gt_img, gt_box, gt_cat = [], [], []
    img_id = 1
    inst = 1
    for v, L in enumerate(lengths, 1):
        ann['videos'].append(dict(id=v, name=f'val/v{v}'))
        first = img_id
        for f in range(L):
            ann['images'].append(dict(file_name=f'val/v{v}/{f:06d}.JPEG', height=720, width=1280, id=img_id,
                                      frame_id=f, video_id=v, is_vid_train_frame=False))
            img_id += 1
        for _ in range(rng.integers(1, 4)):  # 1-3 tracks, each over a random span of the video
            s = int(rng.integers(0, max(1, L // 3)))
            e = int(rng.integers(min(L, s + max(1, L // 2)), L + 1))
            n = e - s
            speed = rng.choice([0.3, 2.0, 8.0])
            xy = np.cumsum(rng.normal(0, speed, (n, 2)), 0) + rng.uniform(100, 600, 2)
            wh = rng.uniform(20, 400, 2) * np.exp(np.cumsum(rng.normal(0, 0.01, (n, 2)), 0))
            boxes = np.round(np.concatenate([xy, xy + wh], 1))
            cat = int(rng.integers(1, 31))
            for k in range(n):
                x1, y1, x2, y2 = (int(b) for b in boxes[k])
                ann['annotations'].append(dict(id=len(ann['annotations']) + 1, video_id=v, image_id=first + s + k,
                                               category_id=cat, instance_id=inst, bbox=[x1, y1, x2 - x1, y2 - y1],
                                               area=(x2 - x1) * (y2 - y1), iscrowd=False, occluded=False, generated=False))
            gt_img.append(np.arange(first + s, first + e))
            gt_box.append(boxes)
            gt_cat.append(np.full(n, cat))
            inst += 1
    gi, gb, gc = np.concatenate(gt_img), np.concatenate(gt_box), np.concatenate(gt_cat)
    # true-ish detections: jittered objects (some twice, some with a wrong class)
    n_obj = len(gi)
    n_true = min(num_dets // 2, 2 * n_obj)
    pick = rng.integers(0, n_obj, n_true)
    wh = gb[pick, 2:] - gb[pick, :2]
    jb = gb[pick] + rng.normal(0, 1, (n_true, 4)) * np.concatenate([wh, wh], 1) * 0.08
    jc = np.where(rng.random(n_true) < 0.85, gc[pick], rng.integers(1, 31, n_true))
    js = np.clip(rng.beta(4, 1.5, n_true), 1e-4, 1)
    n_bg = num_dets - n_true
    bi = rng.integers(1, num_frames + 1, n_bg)
    bxy = rng.uniform(0, 1100, (n_bg, 2))
    bb = np.concatenate([bxy, bxy + rng.uniform(10, 300, (n_bg, 2))], 1)
    bc = rng.integers(1, 31, n_bg)
    bs = np.clip(rng.beta(1, 6, n_bg), 1e-4, 1)
    img = np.concatenate([gi[pick], bi]).tolist()
    box = np.concatenate([jb, bb])
    box = np.concatenate([box[:, :2], box[:, 2:] - box[:, :2]], 1).tolist()
    cat = np.concatenate([jc, bc]).tolist()
    score = np.concatenate([js, bs]).astype(np.float32).tolist()
    results = [dict(image_id=i, category_id=c, bbox=b, score=s) for i, c, b, s in zip(img, cat, box, score)]
    return ann, results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--frames', type=int, default=176126)
    ap.add_argument('--videos', type=int, default=555)
    ap.add_argument('--dets', type=int, default=1_500_000)
    ap.add_argument('--no-coco', action='store_true', help='skip the pycocotools AP50 (the slow part)')
    args = ap.parse_args(argv)

    t = time.perf_counter()
    ann, results = synthetic(args.frames, args.videos, args.dets)
    print(f'synthetic set: {len(ann["images"])} frames, {len(ann["annotations"])} objects, '
          f'{len(results)} detections ({time.perf_counter() - t:.1f} s to generate)')

    times = {}
    t0 = time.perf_counter()
    validate_results(results)
    gt = load_ground_truth(ann)
    det = results_to_arrays(results, gt)
    times['load (validate + arrays)'] = time.perf_counter() - t0
    t = time.perf_counter()
    mot = compute_motion_iou(gt)
    times['motion IoU from ground truth'] = time.perf_counter() - t
    t = time.perf_counter()
    r = vid_eval(gt, det, mot, keep_curves=False)
    times['VID mAP + slow/medium/fast'] = time.perf_counter() - t
    times['VID total'] = time.perf_counter() - t0
    print(f'VID mAP {r.map:.4f}  slow {r.motion_map("slow"):.4f}  medium {r.motion_map("medium"):.4f}  '
          f'fast {r.motion_map("fast"):.4f}  (motion IoU computed)')
    if not args.no_coco:
        from viddet.evaluation.coco import coco_evaluate
        t = time.perf_counter()
        c = coco_evaluate(results, ann)
        times['COCO AP50 (pycocotools)'] = time.perf_counter() - t
        print(f'COCO AP50 {c.ap50:.4f}')
    for k, v in times.items():
        print(f'{k:<32} {v:8.1f} s')


if __name__ == '__main__':
    main()
