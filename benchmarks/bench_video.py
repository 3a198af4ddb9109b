"""Per-frame cost and peak memory of every VID method on long synthetic videos (issue #6).

What it runs (all R-50, CPU, synthetic smooth frames, random weights: see viddet.benchmark):

1. ``full``: each method at 1000x600 for ``--full-frames`` timed frames after a warm-up (the
   warm-up absorbs the per-video set-up: SELSA/TRoI's 14 references, FGFA's window). This is the
   per-frame cost at the real input size.
2. ``long``: each method at a reduced input size (``--small-size``, default 320x192, still the
   full R-50 model) on a ``--short-len`` (100) and a ``--long-len`` (1000) frame video: seconds
   per frame and the peak memory, to show that memory does not grow with the video length.
   (A 1000-frame video at 1000x600 takes hours per method on a 2-core CPU.)
3. ``selsa-cache``: SELSA and TRoI per-frame cost with the reference cache and without it
   (``ref_cache=False``: the references' RPN + RoI head recomputed for every frame, MMTracking's way).
4. ``fgfa-floor``: FGFA's per-frame cost against its floor, one backbone pass + 30 FlowNet passes
   batched as FGFA batches them, measured in the same process.
5. ``peak``: the machine's achievable fp32 GFLOP/s (a 4096^3 matmul through torch.mm, and a
   3x3 512->512 convolution at 64x64 through oneDNN), and each method's counted GFLOP per
   steady-state frame (``torch.utils.flop_counter``: convolutions and matrix products), giving
   the achieved fraction (FLOPs counted on the plain modules, ``speedups.revert``: the same
   arithmetic as the fast paths, in ops the counter knows; the gathers of the factorized TRoI / FGFA
   embedding (``embedding_bag``) are not counted).

Each part writes ``<out>/<part>.json``; ``--parts`` selects them. Example (what RESULTS.md reports):

    python benchmarks/bench_video.py --threads 1 --out benchmarks/results/cpu_t1 --parts peak full selsa-cache fgfa-floor
    python benchmarks/bench_video.py --threads 1 --out benchmarks/results/cpu_t1 --parts long
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from viddet import speedups
from viddet.benchmark import SyntheticVideo, benchmark, build_model
from viddet.engine.video import run_video
from viddet.fileio import atomic_write_json
from viddet.timing import StageTimer

METHODS = ('single', 'dff', 'fgfa', 'selsa', 'troi')
# per-method warm-up frames at full size: DFF's key frame interval is 10, so 1 warm-up frame and
# 10 timed frames give its 1-in-10 key-frame mix.
FULL_FRAMES = {'single': 5, 'dff': 10, 'fgfa': 4, 'selsa': 5, 'troi': 4}


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    cpu = ''
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    except OSError:
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'torch': torch.__version__, 'python': platform.python_version(),
            'loadavg_1_5_15': load, 'date': time.strftime('%Y-%m-%d %H:%M:%S %Z')}


def _bench(**kw) -> dict:
    gc.collect()
    t0 = time.perf_counter()
    r = benchmark(**kw).as_dict()
    r['wall_s'] = round(time.perf_counter() - t0, 1)
    r['loadavg_after'] = os.getloadavg()
    mem = [m for m in r.pop('memory_mb_per_frame') if m is not None]
    if mem:  # RSS (minus the baseline) after frames 10%, 50%, 100% of the video: flat = no growth
        n = len(mem)
        r['rss_delta_mb_at_10_50_100pct'] = [round(mem[max(0, int(n * q) - 1)], 1) for q in (0.1, 0.5, 1.0)]
    return r


def part_full(args):
    out = []
    for m in args.methods:
        # FGFA: 15 warm-up frames, so that the timed frames have full 31-frame windows (30 flows)
        r = _bench(method=m, size=(1000, 600), frames=args.full_frames or FULL_FRAMES[m],
                   warmup=1 if m != 'fgfa' else 15)
        print(f"{m:7s} 1000x600  {r['latency_ms_median'] / 1000:7.2f} s/frame (median)  "
              f"p90 {r['latency_ms_p90'] / 1000:.2f}  peak {r['peak_memory_mb']:.0f} MB  {r['stages_ms']}", flush=True)
        out.append(r)
        if m == 'fgfa':  # the plain modules (MMTracking's 31 embedding convs per frame)
            r = _bench(method=m, size=(1000, 600), frames=args.full_frames or FULL_FRAMES[m], warmup=15,
                       fast=False)
            r['variant'] = 'plain (no fast paths)'
            print(f"fgfa (plain) {r['latency_ms_median'] / 1000:7.2f} s/frame  "
                  f"peak {r['peak_memory_mb']:.0f} MB  {r['stages_ms']}", flush=True)
            out.append(r)
    return out


def part_long(args):
    w, h = (int(v) for v in args.small_size.split('x'))
    out = []
    for m in args.methods:
        for n in (args.short_len, args.long_len):
            r = _bench(method=m, size=(w, h), frames=n - 1, warmup=1)
            r.pop('latency_ms_per_frame')
            print(f"{m:7s} {w}x{h} {n:5d} frames  {r['latency_ms_mean'] / 1000:6.3f} s/frame (mean)  "
                  f"peak {r['peak_memory_mb']:.0f} MB  rss@10/50/100% {r.get('rss_delta_mb_at_10_50_100pct')}",
                  flush=True)
            out.append(r)
    return out


def part_selsa_cache(args):
    out = []
    for m in [m for m in args.methods if m in ('selsa', 'troi')]:
        for cache in (True, False):
            r = _bench(method=m, size=(1000, 600), frames=args.full_frames or 3, warmup=1, ref_cache=cache)
            print(f"{m:7s} ref_cache={cache!s:5s} {r['latency_ms_median'] / 1000:7.2f} s/frame  {r['stages_ms']}",
                  flush=True)
            out.append(r)
    return out


def part_fgfa_floor(args):
    """FGFA frames interleaved with the floor (1 backbone + 30 FlowNet passes, same batching)."""
    model = build_model('fgfa', 'r50', fast=not args.plain)
    video = SyntheticVideo(1000, 600, 40)
    timer = StageTimer(True)
    frames, floors = [], []
    from viddet.data.transforms import preprocess
    img, meta = preprocess(video.frame(0), (1000, 600))
    img = img[None]
    srcs = torch.cat([preprocess(video.frame(i), (1000, 600))[0][None] for i in range(1, 31)])
    with torch.inference_mode():
        it = run_video(model, video, scale=(1000, 600), timer=timer)
        for _ in range(16):  # reach the steady state: t = 15 has a full 31-frame window, no replication
            next(it)
        for _ in range(args.full_frames or 3):
            t0 = time.perf_counter()
            res = next(it)
            frames.append((time.perf_counter() - t0, res.stages))
            t0 = time.perf_counter()
            model.detector.extract_feat(img)
            model.motion(img.expand(30, -1, -1, -1), srcs, meta.img_shape, chunk_size=model.flow_chunk)
            floors.append(time.perf_counter() - t0)
        it.close()
    fgfa = statistics.median(f for f, _ in frames)
    floor = statistics.median(floors)
    r = {'fgfa_s_per_frame': [round(f, 3) for f, _ in frames], 'floor_s': [round(f, 3) for f in floors],
         'fgfa_median_s': round(fgfa, 3), 'floor_median_s': round(floor, 3), 'ratio': round(fgfa / floor, 3),
         'stages_s': [{k: round(v, 3) for k, v in s.items()} for _, s in frames],
         'flow_chunk': model.flow_chunk, 'fast_paths': speedups.is_converted(model),
         'cpu_kernels': None if args.plain else speedups.kernels_of(model).as_dict(),
         'loadavg_after': os.getloadavg()}
    print(f"fgfa {fgfa:.2f} s/frame vs floor (backbone + 30 FlowNet) {floor:.2f} s: ratio {fgfa / floor:.2f}", flush=True)
    return [r]


def part_peak(args):
    from torch.utils.flop_counter import FlopCounterMode

    def best(f, n=5):
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts), statistics.median(ts)

    with torch.inference_mode():
        a = torch.randn(4096, 4096)
        mm_best, mm_med = best(lambda: a.mm(a))
        x = torch.randn(1, 512, 64, 64).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(512, 512, 3, padding=1)
        cv_best, cv_med = best(lambda: conv(x))
    mm_flop, cv_flop = 2 * 4096 ** 3, 2 * 64 * 64 * 512 * 512 * 9
    r = {'matmul_gflops_best': round(mm_flop / mm_best / 1e9, 1), 'matmul_gflops_median': round(mm_flop / mm_med / 1e9, 1),
         'conv_gflops_best': round(cv_flop / cv_best / 1e9, 1), 'conv_gflops_median': round(cv_flop / cv_med / 1e9, 1),
         'methods': {}}
    print(f"machine: torch.mm {r['matmul_gflops_best']} GFLOP/s (best of 5), oneDNN conv {r['conv_gflops_best']} GFLOP/s")
    for m in args.methods:
        model = build_model(m, 'r50')
        video = SyntheticVideo(1000, 600, 40)  # FGFA frame 16 of 40 has its full 31-frame window
        with torch.inference_mode():
            it = run_video(model, video, scale=(1000, 600))
            for _ in range(16 if m == 'fgfa' else 2):  # steady state (DFF: frame 2 is a non-key frame)
                next(it)
            # count on the plain modules: FlopCounterMode knows the plain aten ops (convolution, mm,
            # addmm, bmm), not torch.ops.mkldnn.*; embedding_bag is not counted
            kernels = speedups.kernels_of(model)
            speedups.revert(model)
            counter = FlopCounterMode(display=False)
            try:
                with counter:
                    next(it)
            finally:
                speedups.convert(model, kernels)
            it.close()
        g = counter.get_total_flops() / 1e9
        r['methods'][m] = {'counted_gflop_per_frame': round(g, 1)}
        print(f'{m:7s} counted {g:.1f} GFLOP in one steady-state frame', flush=True)
    return [r]


PARTS = {'full': part_full, 'long': part_long, 'selsa-cache': part_selsa_cache,
         'fgfa-floor': part_fgfa_floor, 'peak': part_peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default='benchmarks/results/cpu')
    ap.add_argument('--parts', nargs='+', default=list(PARTS), choices=list(PARTS))
    ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    ap.add_argument('--full-frames', type=int, default=None, help='timed frames at 1000x600 (default per method)')
    ap.add_argument('--small-size', default='320x192')
    ap.add_argument('--short-len', type=int, default=100)
    ap.add_argument('--long-len', type=int, default=1000)
    ap.add_argument('--plain', action='store_true', help='fgfa-floor: FGFA on the plain modules (no fast paths)')
    ap.add_argument('--threads', type=int, default=None,
                    help='torch CPU threads (default: torch decides; 1 is faster on a busy shared machine)')
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    for part in args.parts:
        print(f'== {part}', flush=True)
        t0 = time.perf_counter()
        results = PARTS[part](args)
        record = {'part': part, 'machine': machine(), 'wall_s': round(time.perf_counter() - t0, 1),
                  'args': vars(args), 'results': results}
        atomic_write_json(out / f'{part}.json', record, indent=1)


if __name__ == '__main__':
    main()
