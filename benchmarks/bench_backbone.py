"""The R-50 DC5 backbone fused (``viddet.speedups.detector.FastResNetDC5``) against the plain module,
timed interleaved so that both see the same machine state (random weights; the cost does not
depend on the values).

    python benchmarks/bench_backbone.py [--threads 1] [--reps 4] [--size 1008x608]
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_backbone.py
"""
from __future__ import annotations

import argparse
import time

import torch

from viddet.models.backbones import ResNetDC5
from viddet.runtime import cpu_kernels, set_threads
from viddet.speedups.detector import FastResNetDC5


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--reps', type=int, default=4)
    ap.add_argument('--size', default='1008x608', help='input WxH in pixels')
    args = ap.parse_args(argv)
    set_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split('x'))
    torch.manual_seed(0)
    backbone = ResNetDC5().eval()
    kernels = cpu_kernels()
    if not kernels.fused:
        raise SystemExit('the fused kernels do not run here (no oneDNN CPU build?)')
    fast = FastResNetDC5(backbone, kernels)
    x = torch.randn(1, 3, h, w)
    times = {'fused': [], 'plain': []}
    with torch.inference_mode():
        ref = backbone(x)
        diff = (fast(x) - ref).abs().max().item()
        for _ in range(args.reps):
            t = time.perf_counter()
            fast(x)
            times['fused'].append(time.perf_counter() - t)
            t = time.perf_counter()
            backbone(x)
            times['plain'].append(time.perf_counter() - t)
    print(f'R-50 DC5 backbone, 1x3x{h}x{w}, {args.threads} thread(s), {args.reps} interleaved runs (s); '
          f'CPU kernels: {kernels}:')
    for k, v in times.items():
        print(f'  {k}: ' + ' '.join(f'{t:.2f}' for t in v) + f'   (min {min(v):.2f})')
    print(f'  fused gain {min(times["plain"]) / min(times["fused"]):.2f}x; max |fused - plain| = {diff:.2e}')


if __name__ == '__main__':
    main()
