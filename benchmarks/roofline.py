"""How close each method runs to this CPU's limit: its FLOPs per frame against the machine's peak.

For each method (R-50, 1000x600, the parity checkpoints, offline over the 12 real frames of the
parity clip), at the given thread count:

* **peak**: the best fp32 GFLOP/s this machine reaches on the work the detectors are made of, the
  larger of a 4096^3 matrix product and a 3x3 512->512 convolution on 64x64 (best of 5), measured
  before and after each method (a shared VM's speed drifts): a method is judged against the mean;
* **FLOPs per frame**: counted with ``torch.utils.flop_counter`` on a steady-state frame of the
  model as it runs (every fast path on, whose algorithms may do fewer FLOPs than the plain
  modules: FGFA's tap embeddings, TRoI's Gram matrices), with only the fused oneDNN kernels
  swapped for the plain layers they equal (the fast modules given :func:`plain_layer_kernels`) so
  that the counter sees them; gathers (``embedding_bag``) and NMS count no FLOPs;
* **executed FLOPs per frame**: the same frame counted again with every fast path on, the fused
  oneDNN kernels included (their FLOP formulas registered below: a convolution's or linear layer's
  multiply-adds on its shapes): where the Winograd path runs (``viddet.speedups.winograd``) the
  counter sees its batched products, which do 16/36 of the direct convolution's multiplications
  (its input and output transforms are additions, not counted); the **executed fraction** judges
  this count against the same peak;
* **roofline time** = FLOPs / peak, and the **fraction** = roofline time / measured seconds per
  frame (median of the steady-state frames: after the first, which holds SELSA's references and
  FGFA's window fill; DFF: its 1-in-10 mix, one steady key frame and nine times the median
  steady non-key frame, the first key frame and the first non-key frame, which creates FlowNet's
  kernels, being its warm-up).

    python benchmarks/roofline.py --threads 1 --out benchmarks/results/roofline_t1.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

from bench_clip import CHECKPOINT_KEYS, SHARED, checkpoint   # benchmarks/ is on the path of this script
from bench_gemm import best_seconds


def peak_gflops(repeat: int = 5) -> dict:
    def best(fn):
        return best_seconds(fn, repeat)
    with torch.inference_mode():
        a = torch.randn(4096, 4096)
        mm = 2 * 4096 ** 3 / best(lambda: a.mm(a)) / 1e9
        conv = torch.nn.Conv2d(512, 512, 3, padding=1)
        x = torch.randn(1, 512, 64, 64)
        cv = 2 * 64 * 64 * 512 * 512 * 9 / best(lambda: conv(x)) / 1e9
    return {'matmul': round(mm, 1), 'conv3x3': round(cv, 1), 'peak': round(max(mm, cv), 1)}


def _register_onednn_flop_formulas() -> None:
    """FLOP formulas for the fused oneDNN ops the fast paths call, which ``FlopCounterMode`` does
    not know: 2 x multiply-adds of the convolution / linear layer on the shapes (the fused bias,
    activation and sum count nothing, as for the plain ops)."""
    mk = torch.ops.mkldnn
    if getattr(mk, '_convolution_pointwise', None) is None or mk._convolution_pointwise in \
            torch.utils.flop_counter.flop_registry:
        return

    def is_4d(shape):
        return isinstance(shape, (list, tuple)) and len(shape) == 4

    @register_flop_formula(mk._convolution_pointwise)
    def _conv(x, a, b, *args, out_shape=None, **kwargs):
        # default: (X, W, B, ...); binary (the fused sum): (X, other, W, B, ...)
        return conv_flop_count(x, b if is_4d(b) else a, out_shape)

    @register_flop_formula(mk._convolution_transpose_pointwise)
    def _deconv(x, w, *args, out_shape=None, **kwargs):
        # oneDNN's transposed weight is (in, out / groups, kh, kw), as conv_transpose2d's
        return conv_flop_count(x, w, out_shape, transposed=True)

    @register_flop_formula(mk._linear_pointwise)
    def _linear(x, a, b, *args, out_shape=None, **kwargs):
        w = b if isinstance(b, (list, tuple)) and len(b) == 2 else a   # binary: (X, other, W, ...)
        rows = 1
        for n in x[:-1]:
            rows *= n
        return 2 * rows * w[0] * w[1]


def plain_layer_kernels(kernels):
    """The CPU kernel choice ``kernels`` (:class:`viddet.runtime.CpuKernels`) with the fused
    oneDNN kernels, Winograd and the oneDNN GEMM off: the fast modules then run the plain layers
    (convolutions, ``F.linear``, ``torch.mm``) that ``FlopCounterMode`` counts, while their other
    algorithms (tap embeddings, Gram matrices, caches) stay."""
    return dataclasses.replace(kernels, fused=False, winograd=False, gemm='mkl')


def measure(method: str, ckpt: Path, count_frame: int) -> dict:
    from viddet import speedups
    from viddet.checkpoints.loading import load_model
    from viddet.data.image_sources import FolderSource
    from viddet.engine.video import run_video
    model = load_model(str(ckpt), method=method).model
    kernels = speedups.kernels_of(model)
    times, flops, executed = [], None, None
    with FolderSource(str(SHARED / 'clips' / 'vid7010_first12')) as source:
        it = run_video(model, source, mode='offline')
        t0 = time.perf_counter()
        for i in range(12):
            if i == count_frame:   # the FLOPs of one steady-state frame (not timed)
                counter = FlopCounterMode(display=False)
                speedups.convert(model, plain_layer_kernels(kernels))   # keeps the fast modules' caches
                with counter:
                    next(it)
                speedups.convert(model, kernels)
                flops = counter.get_total_flops()
                t0 = time.perf_counter()
                continue
            if i == count_frame + 1:   # the next frame as it runs (not timed either)
                _register_onednn_flop_formulas()
                counter = FlopCounterMode(display=False)
                with counter:
                    next(it)
                executed = counter.get_total_flops()
                t0 = time.perf_counter()
                continue
            next(it)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        it.close()
    frames = [i for i in range(12) if i not in (count_frame, count_frame + 1)]
    return {'seconds_per_frame': [round(t, 3) for t in times], 'frames': frames,
            'gflop_per_frame': round(flops / 1e9, 1),
            'executed_gflop_per_frame': round(executed / 1e9, 1),
            'key_frame_interval': getattr(model, 'key_frame_interval', None), 'cpu_kernels': kernels.as_dict(),
            'steady_median_s': round(statistics.median(times[1:]), 3), 'first_s': round(times[0], 3)}


def dff_steady_seconds(frames, seconds, interval: int):
    """(key-frame seconds, median non-key seconds) of DFF's steady state: the key frames after the
    first, and the non-key frames after the first one (frame indices ``frames``, one time each)."""
    keys = [t for i, t in zip(frames, seconds) if i % interval == 0 and i > 0]
    nonkeys = [t for i, t in zip(frames, seconds) if i % interval != 0]
    if not keys or len(nonkeys) < 2:
        raise SystemExit(f'DFF key frame interval {interval}: the 12-frame clip has no steady key frame')
    return round(statistics.median(keys), 3), round(statistics.median(nonkeys[1:]), 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--threads', type=int, required=True)
    ap.add_argument('--methods', nargs='+', default=list(CHECKPOINT_KEYS))
    ap.add_argument('--ckpt-dir', default='/tmp/viddet_parity_ckpt')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = peak_gflops()
    print(f"peak fp32 at {args.threads} thread(s): {peak['peak']} GFLOP/s (matmul {peak['matmul']}, conv3x3 {peak['conv3x3']})")
    rows = []
    for m in args.methods:
        before = peak
        # DFF: a non-key frame (its cost mix is reported by the median over the clip); others frame 3
        r = measure(m, checkpoint(m, Path(args.ckpt_dir), SHARED), count_frame=3)
        if m == 'dff':   # FLOPs per frame of its 1-in-10 mix: one key frame (as single) and nine warped ones
            single = measure('single', checkpoint('single', Path(args.ckpt_dir), SHARED), count_frame=3)
            r['gflop_per_frame_mix'] = round((single['gflop_per_frame'] + 9 * r['gflop_per_frame']) / 10, 1)
            r['executed_gflop_per_frame_mix'] = round(
                (single['executed_gflop_per_frame'] + 9 * r['executed_gflop_per_frame']) / 10, 1)
            r['mean_s'] = round(statistics.mean(r['seconds_per_frame'][1:]), 3)
            # its seconds weighted as its FLOPs are: 1 steady key frame, 9 steady non-key frames
            # (the first key frame and the first non-key frame, which creates FlowNet's kernels, are
            # warm-up, as every method's first frame is)
            key_s, nonkey_s = dff_steady_seconds(r['frames'], r['seconds_per_frame'], r['key_frame_interval'])
            r.update(key_s=key_s, nonkey_median_s=nonkey_s, mix_s=round((key_s + 9 * nonkey_s) / 10, 3))
            gflop, executed, seconds = r['gflop_per_frame_mix'], r['executed_gflop_per_frame_mix'], r['mix_s']
        else:
            gflop, executed, seconds = r['gflop_per_frame'], r['executed_gflop_per_frame'], r['steady_median_s']
        # this VM's speed drifts over minutes: the peak is measured again after each method, and the
        # method is judged against the mean of the peaks before and after it
        peak = peak_gflops()
        method_peak = (before['peak'] + peak['peak']) / 2
        r.update(method=m, peak_before=before['peak'], peak_after=peak['peak'],
                 roofline_s=round(gflop / method_peak, 3), fraction=round(gflop / method_peak / seconds, 3),
                 executed_roofline_s=round(executed / method_peak, 3),
                 executed_fraction=round(executed / method_peak / seconds, 3))
        rows.append(r)
        print(f"{m:6s} {gflop:7.1f} GFLOP/frame  peak {before['peak']}/{peak['peak']} GFLOP/s  "
              f"roofline {r['roofline_s']:.3f} s  measured {seconds:.3f} s  "
              f"-> {100 * r['fraction']:.0f}% of the roofline; executed {executed:.1f} GFLOP/frame "
              f"-> {100 * r['executed_fraction']:.0f}%", flush=True)
    if args.out:
        from viddet.fileio import atomic_write_json
        atomic_write_json(args.out, {'threads': args.threads, 'peak_gflops': peak, 'torch': torch.__version__,
                                     'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'cpu_count': os.cpu_count(),
                                     'loadavg_after': os.getloadavg(), 'results': rows}, indent=1)


if __name__ == '__main__':
    main()
