"""viddet vs MMTracking 0.14 on the parity clip, side by side at the same thread count.

MMTracking's times come from ``../shared/parity/timing/mmtracking_2026-12-01.json``: MMTracking 0.14
in test mode on the 12 frames of ``clips/vid7010_first12``, R-50, the ``make_checkpoint.py --seed 0``
checkpoints, model time per frame at 1 and 2 threads, measured on an idle 2-core AMD EPYC (AVX2), with
a calibration workload (torchvision ResNet-50, random weights, 1x3x608x1008, median of 4 after a
warm-up) timed in the same session. This script times the same calibration workload here and
reports both

* the raw seconds per frame of viddet here, and
* viddet's seconds *normalised to that machine*: viddet here x (calibration there / calibration
  here), at the same thread count,

next to MMTracking's: median and mean over the 12 frames, and the first frame separately (it holds
FGFA's window fill and SELSA's 14 references). viddet runs each method exactly as the parity check
does (``load_model``, offline, ``FolderSource``), timing every frame from request to result
(decode, preprocessing, model, post-processing), and counts the reference detections reproduced.

    python benchmarks/bench_clip.py --threads 1 --out benchmarks/results/clip_t1.json
    python benchmarks/bench_clip.py --threads 2 --repeat 3 --out benchmarks/results/clip_t2.json

``--repeat N`` runs every method N times and reports the median of each frame's time, with the
spread between the runs (the machine's run-to-run noise).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'parity'
TIMING = 'timing/mmtracking_2026-12-01.json'
CHECKPOINT_KEYS = {'single': 'dff_r50', 'dff': 'dff_r50', 'fgfa': 'fgfa_r50', 'selsa': 'selsa_r50', 'troi': 'troi_r50'}


def calibration_seconds(repeat: int = 4) -> float:
    """The fixture's calibration workload here: torchvision ResNet-50 (random weights, eval,
    inference mode) on 1x3x608x1008, median of ``repeat`` runs after a warm-up."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 608, 1008)
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def checkpoint(method: str, ckpt_dir: Path, shared: Path) -> Path:
    path = ckpt_dir / f'{CHECKPOINT_KEYS[method]}_seed0.pth'
    if not path.exists():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(shared / 'make_checkpoint.py'),
                        str(shared / 'keys' / f'{CHECKPOINT_KEYS[method]}.txt'), str(path), '--seed', '0'], check=True)
    return path


def run_once(method: str, ckpt: Path, shared: Path):
    """Seconds per frame of one offline run over the clip, and the reference detections reproduced."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
    from test_parity import match_detections
    from viddet.checkpoints.loading import load_model
    from viddet.data.image_sources import FolderSource
    from viddet.engine.video import run_video
    model = load_model(str(ckpt), method=method).model
    ref = json.loads((shared / f'ref_{method}_vid7010_first12_seed0.json').read_text())
    times, hit, total = [], 0, 0
    with FolderSource(str(shared / 'clips' / 'vid7010_first12')) as source:
        t0 = time.perf_counter()
        for res, rf in zip(run_video(model, source, mode='offline'), ref['frames']):
            times.append(time.perf_counter() - t0)
            d = res.detections
            total += len(rf['detections'])
            hit += match_detections(rf['detections'], d.boxes, d.scores, d.labels)
            t0 = time.perf_counter()
    return times, hit, total


def summary(times):
    return {'median': round(statistics.median(times), 3), 'mean': round(statistics.mean(times), 3),
            'first': round(times[0], 3), 'median_after_first': round(statistics.median(times[1:]), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--shared', default=str(SHARED))
    ap.add_argument('--ckpt-dir', default='/tmp/viddet_parity_ckpt')
    ap.add_argument('--threads', type=int, required=True, choices=(1, 2), help='the fixture has 1 and 2 threads')
    ap.add_argument('--methods', nargs='+', default=['single', 'dff', 'fgfa', 'selsa', 'troi'])
    ap.add_argument('--repeat', type=int, default=1)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    fixture = json.loads((shared / TIMING).read_text())
    cal_there = fixture['calibration'][f'seconds_threads_{args.threads}']
    cal_here = calibration_seconds()
    factor = cal_there / cal_here
    print(f'calibration (torchvision R-50, 608x1008, {args.threads} thread(s)): here {cal_here:.3f} s, '
          f'on the MMTracking machine {cal_there:.3f} s -> times here x {factor:.3f}')
    print(f'MMTracking: {shared / TIMING}')
    rows = []
    for method in args.methods:
        ckpt = checkpoint(method, Path(args.ckpt_dir), shared)
        runs = [run_once(method, ckpt, shared) for _ in range(args.repeat)]
        per_frame = [statistics.median(r[0][i] for r in runs) for i in range(len(runs[0][0]))]
        spread = [round(statistics.median(r[0]) / statistics.median(per_frame) - 1, 3) for r in runs]
        here = summary(per_frame)
        normalised = summary([t * factor for t in per_frame])
        key = f'{method}_threads_{args.threads}'
        mm = fixture['seconds_per_frame'].get(key)
        row = {'method': method, 'threads': args.threads, 'viddet_here': here, 'viddet_normalised': normalised,
               'viddet_seconds_per_frame': [round(t, 3) for t in per_frame], 'run_spread': spread,
               'runs_seconds_per_frame': [[round(t, 3) for t in r[0]] for r in runs],
               'reproduced': f'{runs[0][1]}/{runs[0][2]}'}
        if mm:
            row['mmtracking'] = summary(mm)
            row['speedup_median'] = round(statistics.median(mm) / normalised['median'], 2)
            row['speedup_mean'] = round(statistics.mean(mm) / normalised['mean'], 2)
        rows.append(row)
        vs = (f"MMTracking median {row['mmtracking']['median']:.2f} mean {row['mmtracking']['mean']:.2f} "
              f"first {row['mmtracking']['first']:.2f} -> x{row['speedup_median']} (median) x{row['speedup_mean']} (mean)"
              if mm else 'MMTracking: not in the fixture at this thread count')
        print(f"{method:6s} viddet normalised median {normalised['median']:.2f} mean {normalised['mean']:.2f} "
              f"first {normalised['first']:.2f} s/frame (here {here['median']:.2f}); {vs}; "
              f"reproduced {row['reproduced']}; run spread {spread}", flush=True)
    if args.out:
        from viddet.fileio import atomic_write_json
        from viddet.runtime import cpu_kernels   # what load_model gives the fast modules
        atomic_write_json(args.out, {'threads': args.threads, 'torch': torch.__version__,
                                     'cpu_kernels': cpu_kernels().as_dict(), 'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'cpu_count': os.cpu_count(),
                                     'calibration_here_s': round(cal_here, 3), 'calibration_there_s': cal_there,
                                     'mmtracking_file': str(shared / TIMING), 'loadavg_after': os.getloadavg(),
                                     'results': rows}, indent=1)


if __name__ == '__main__':
    main()
