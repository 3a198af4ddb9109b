"""Speed of FlowNetSimple (DFF's non-key frames, FGFA's 30 pairs per frame) with the plain modules
and with viddet's fast module (viddet.speedups.flownet.FastFlowNetSimple), per image pair, at the DFF
input size.

Times ``prepare_inputs`` (the 2x downsampled 6-channel pair), the network (``forward_prepared``)
and the whole ``forward`` (min over ``--reps``; the first call, which packs the weights, is not
timed) and prints the largest difference of the two flows (float rounding, in pixels). Random
weights unless ``--checkpoint`` (the cost does not depend on the values).

    python benchmarks/bench_flownet.py [--threads 1] [--batch 1] [--size 1008x608] [--reps 5]
    python benchmarks/bench_flownet.py --batch 15                 # one FGFA chunk (flow_chunk)
    python benchmarks/bench_flownet.py --checkpoint dff_r50.pth   # the real `motion.` weights
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_flownet.py    # an AVX2-only CPU's kernels
"""
from __future__ import annotations

import argparse
import time

import torch

from viddet import speedups
from viddet.models.flownet import FlowNetSimple
from viddet.runtime import cpu_kernels, set_threads


def _min_time(fn, reps: int) -> float:
    fn()
    best = float('inf')
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--batch', type=int, default=1, help='image pairs per call')
    ap.add_argument('--size', default='1008x608', help='padded frame WxH (a multiple of 16)')
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--checkpoint', help='MMTracking DFF/FGFA checkpoint (its `motion.` keys)')
    args = ap.parse_args(argv)
    set_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split('x'))
    net = FlowNetSimple().eval()
    if args.checkpoint:
        sd = torch.load(args.checkpoint, map_location='cpu')
        sd = sd.get('state_dict', sd)
        net.load_state_dict({k[len('motion.'):]: v for k, v in sd.items() if k.startswith('motion.')})
    g = torch.Generator().manual_seed(0)
    tgt = torch.randn(1, 3, h, w, generator=g)
    src = torch.randn(args.batch, 3, h, w, generator=g)
    shape = (h - 8, w - 8)          # padded bottom/right, as a 1000x600 frame in 1008x608
    flows = {}
    print(f'FlowNetSimple {w}x{h} (network input {w // 2}x{h // 2}), {args.batch} pair(s) per call, '
          f'{torch.get_num_threads()} thread(s), CPU kernels: {cpu_kernels()}; ms per pair (min of {args.reps})')
    for mode in ('plain', 'fast'):
        net = speedups.convert(net) if mode == 'fast' else speedups.revert(net)
        with torch.inference_mode():
            x = net.prepare_inputs(tgt, src, shape)
            prep = _min_time(lambda: net.prepare_inputs(tgt, src, shape), args.reps)
            network = _min_time(lambda: net.forward_prepared(x), args.reps)
            total = _min_time(lambda: net(tgt, src, shape), args.reps)
            flows[mode] = net(tgt, src, shape)
        n = args.batch
        print(f'  {mode:5s}: prepare {prep / n * 1e3:7.1f}  network {network / n * 1e3:7.1f}  '
              f'forward {total / n * 1e3:7.1f}')
    diff = (flows['fast'] - flows['plain']).abs().max().item()
    print(f'  max |fast - plain| = {diff:.2e} px (max |flow| {flows["plain"].abs().max().item():.2f} px)')


if __name__ == '__main__':
    main()
