"""viddet vs MMTracking 0.14 on the parity clip: seconds per frame over the same 12 real frames.

Runs each method (R-50, the parity checkpoints of ../shared/parity: make_checkpoint.py --seed 0)
offline over ``clips/vid7010_first12`` exactly as the parity check does, timing every frame
(decode + preprocessing + model, first frame included: it holds FGFA's window fill and SELSA's 14
references), and puts the result next to MMTracking's own ``seconds_per_frame`` from the reference
JSONs (MMTracking 0.14.0 test mode, same kind of 2-core CPU). Also counts the reference detections
reproduced (IoU >= 0.99, |score diff| <= 1e-3, same class).

    python benchmarks/bench_clip.py --ckpt-dir /tmp/ckpt --threads 1 --out benchmarks/results/clip_t1.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import cv2
import torch

from viddet.engine.video import StageTimer, run_video
from viddet.fileio import atomic_write_json
from viddet.methods import build_method

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'parity'


def _match(rb, db):
    if rb[0] == rb[2] or rb[1] == rb[3]:  # zero-area reference box: all coordinates within 0.1 px
        return all(abs(a - b) <= 0.1 for a, b in zip(rb, db))
    ix = max(0.0, min(rb[2], db[2]) - max(rb[0], db[0]))
    iy = max(0.0, min(rb[3], db[3]) - max(rb[1], db[1]))
    inter = ix * iy
    union = (rb[2] - rb[0]) * (rb[3] - rb[1]) + (db[2] - db[0]) * (db[3] - db[1]) - inter
    return union > 0 and inter / union >= 0.99


def run(method, ckpt_dir, shared):
    ck = {'single': 'dff'}.get(method, method)
    sd = torch.load(Path(ckpt_dir) / f'{ck}_r50.pth', weights_only=True)['state_dict']
    model = build_method(method, 'r50').eval()
    if method == 'single':
        sd = {k: v for k, v in sd.items() if k.startswith('detector.')}
    model.load_state_dict(sd, strict=True)
    ref = json.loads((shared / f'ref_{method}_vid7010_first12_seed0.json').read_text())
    files = sorted((shared / 'clips' / 'vid7010_first12').iterdir())
    frames = ((i, f.name, cv2.imread(str(f))) for i, f in enumerate(files))
    fetch = lambda i: (files[i].name, cv2.imread(str(files[i])))  # noqa: E731
    times, stages, hit, total = [], [], 0, 0
    t0 = time.perf_counter()
    for res, rf in zip(run_video(model, frames, length=len(files), fetch=fetch, timer=StageTimer(True)),
                       ref['frames']):
        now = time.perf_counter()
        times.append(now - t0)
        stages.append({k: round(v, 3) for k, v in res.stages.items()})
        d = res.detections
        boxes, scores, labels = d.boxes.tolist(), d.scores.tolist(), d.labels.tolist()
        used = set()
        for rd in rf['detections']:
            total += 1
            for j in range(len(boxes)):
                if j not in used and labels[j] == rd['label'] and abs(scores[j] - rd['score']) <= 1e-3 \
                        and _match(rd['bbox'], boxes[j]):
                    used.add(j)
                    hit += 1
                    break
        t0 = time.perf_counter()
    mm = ref['seconds_per_frame']
    return {'method': method, 'viddet_s_per_frame': [round(t, 3) for t in times],
            'viddet_mean': round(statistics.mean(times), 3), 'viddet_median': round(statistics.median(times), 3),
            'mmtracking_mean': round(statistics.mean(mm), 3), 'mmtracking_median': round(statistics.median(mm), 3),
            'speedup_mean': round(statistics.mean(mm) / statistics.mean(times), 2),
            'reproduced': f'{hit}/{total}', 'stages_s': stages, 'loadavg_after': os.getloadavg()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--ckpt-dir', default='/tmp/ckpt')
    ap.add_argument('--shared', default=str(SHARED))
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--methods', nargs='+', default=['single', 'dff', 'fgfa', 'selsa', 'troi'])
    ap.add_argument('--out', default='benchmarks/results/clip.json')
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = []
    for m in args.methods:
        r = run(m, args.ckpt_dir, Path(args.shared))
        print(f"{m:7s} viddet {r['viddet_mean']:6.2f} s/frame (median {r['viddet_median']:.2f})  "
              f"MMTracking {r['mmtracking_mean']:6.2f} (median {r['mmtracking_median']:.2f})  "
              f"x{r['speedup_mean']}  reproduced {r['reproduced']}", flush=True)
        out.append(r)
    atomic_write_json(args.out, {'threads': torch.get_num_threads(), 'torch': torch.__version__,
                                 'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'results': out}, indent=1)


if __name__ == '__main__':
    main()
