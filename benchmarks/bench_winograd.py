"""Winograd F(2x2, 3x3) against oneDNN's direct kernel on the detectors' 3x3 convolutions.

For each stride-1 3x3 convolution of the R-50 DC5 Faster R-CNN at 1000x600 (padded 1008x608) and of
FlowNetSimple's encoder (DFF / FGFA, input at half resolution), one image, channels-last input as
the fast paths feed it, at the given thread count:

* seconds of ``viddet.speedups.winograd.WinogradConv`` and of the direct kernel the fast path uses
  otherwise (``torch.ops.mkldnn._convolution_pointwise``: as ``viddet.speedups.onednn.FusedConv``
  in the detector, + ReLU; as ``viddet.speedups.flownet.PackedConv``, weights pre-packed for the
  input shape, in FlowNet, + LeakyReLU 0.1), best of ``--repeat``, bias and activation fused in both;
* the speed-up (direct / Winograd), and both results' maximum absolute error against a float64
  ``F.conv2d`` of the same weights (He-initialised weights, unit-normal input);
* whether the fast path takes Winograd for it (``cpu_kernels().winograd`` on this machine,
  ``winograd.applies`` and at least ``winograd.MIN_TILES`` output tiles).

    python benchmarks/bench_winograd.py --threads 1 --out benchmarks/results/winograd_t1.json
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from bench_gemm import best_seconds   # benchmarks/ is on the path of this script

# (where, in channels, out channels, height, width, dilation): feature map sizes of a 1008x608 input
# (FlowNet's: of its 504x304 input, MMTracking's flow at half the image scale)
SHAPES = [
    ('layer1 3x3 (64, excluded)', 64, 64, 152, 252, 1),
    ('layer2 3x3', 128, 128, 76, 126, 1),
    ('layer3 3x3', 256, 256, 38, 63, 1),
    ('layer4 3x3, dilation 2', 512, 512, 38, 63, 2),
    ('neck 2048->512', 2048, 512, 38, 63, 1),
    ('RPN conv', 512, 512, 38, 63, 1),
    ('FlowNet conv3_1', 256, 256, 38, 63, 1),
    ('FlowNet conv4_1', 512, 512, 19, 32, 1),
    ('FlowNet conv5_1', 512, 512, 10, 16, 1),
    ('FlowNet conv6_1 (too few tiles)', 1024, 1024, 5, 8, 1),
]


def measure(c: int, o: int, h: int, w: int, dilation: int, repeat: int, flownet: bool = False) -> dict:
    from viddet.runtime import cpu_kernels
    from viddet.speedups import onednn, winograd
    from viddet.speedups.flownet import PackedConv
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(c, o, 3, padding=dilation, dilation=dilation).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(o, c, 3, 3, generator=g) * math.sqrt(2 / (9 * c)))
        conv.bias.copy_(torch.randn(o, generator=g) * 0.1)
    x = torch.randn(1, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    act, scalars = ('leaky_relu', [0.1]) if flownet else ('relu', [])
    with torch.inference_mode():
        if flownet:
            packed = PackedConv(conv.weight, conv.bias, [1, 1], act=act, scalars=scalars)
            direct = lambda: packed(x)   # noqa: E731
        else:
            fused = onednn.FusedConv(conv)
            direct = lambda: fused(x, act)   # noqa: E731
        wino = winograd.WinogradConv(conv.weight, conv.bias, dilation, act, scalars)
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=dilation, dilation=dilation)
        ref = F.leaky_relu(ref, 0.1) if flownet else F.relu(ref)
        out_direct, out_wino = direct(), wino(x)
        t_direct = best_seconds(direct, repeat)
        t_wino = best_seconds(lambda: wino(x), repeat)
    gflop = 2 * o * c * 9 * h * w / 1e9
    return {'gflop_direct': round(gflop, 2), 'direct_s': round(t_direct, 4), 'winograd_s': round(t_wino, 4),
            'speedup': round(t_direct / t_wino, 2), 'direct_gflops': round(gflop / t_direct, 1),
            'max_abs_err_direct': float(f'{(out_direct.double() - ref).abs().max():.2e}'),
            'max_abs_err_winograd': float(f'{(out_wino.double() - ref).abs().max():.2e}'),
            'output_max': round(float(ref.abs().max()), 2),
            'fast_path_takes_winograd': bool(cpu_kernels().winograd and winograd.applies(conv)
                                             and wino.tiles(x) >= winograd.MIN_TILES)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--threads', type=int, required=True)
    ap.add_argument('--repeat', type=int, default=5)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'convolution':34s} {'GFLOP':>6s} {'direct s':>9s} {'Winograd s':>10s} {'speed-up':>8s} "
          f"{'err direct':>10s} {'err Wino':>9s}  taken")
    for name, c, o, h, w, d in SHAPES:
        r = dict(name=name, in_channels=c, out_channels=o, height=h, width=w, dilation=d,
                 **measure(c, o, h, w, d, args.repeat, flownet=name.startswith('FlowNet')))
        rows.append(r)
        print(f"{name:34s} {r['gflop_direct']:6.2f} {r['direct_s']:9.4f} {r['winograd_s']:10.4f} "
              f"{r['speedup']:7.2f}x {r['max_abs_err_direct']:10.1e} {r['max_abs_err_winograd']:9.1e}  "
              f"{'yes' if r['fast_path_takes_winograd'] else 'no'}", flush=True)
    if args.out:
        from viddet.fileio import atomic_write_json
        atomic_write_json(args.out, {'threads': args.threads, 'torch': torch.__version__,
                                     'cpu_capability': torch.backends.cpu.get_cpu_capability(),
                                     'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'cpu_count': os.cpu_count(),
                                     'results': rows}, indent=1)


if __name__ == '__main__':
    main()
