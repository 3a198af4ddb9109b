"""The detectors' float32 GEMM shapes on this CPU: PyTorch's BLAS (``torch.mm``, MKL on x86 wheels)
against oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``), in GFLOP/s.

This is the measurement behind ``viddet.runtime.cpu_kernels().gemm``: which library
``matmul_nt`` uses for the RoI head's fully connected layers, TRoI's Gram matrices and the tap
projections. Each shape is M x K x N (x is M x K, the weight N x K), best of ``--repeat`` after a
warm-up, both libraries interleaved.

    python benchmarks/bench_gemm.py --threads 1
    python benchmarks/bench_gemm.py --threads 2 --out benchmarks/results/gemm_t2.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [  # (M, K, N, where)
    (300, 25088, 1024, 'box head fc6'),
    (300, 1024, 1024, 'fc7, SELSA fcs'),
    (2394, 512, 2394, 'TRoI Gram matrix'),
    (4500, 1024, 1024, 'SELSA / TRoI references fcs'),
    (2394, 512, 256, 'FGFA / TRoI tap projections'),
]


def best_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--repeat', type=int, default=7)
    p.add_argument('--out', help='write the table as JSON here (refuses to overwrite)')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from viddet.runtime import _cpu_vendor, cpu_kernels
    rows = []
    with torch.inference_mode():
        for m, k, n, where in SHAPES:
            x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
            gflop = 2 * m * k * n / 1e9
            mkl = best_seconds(lambda: torch.addmm(b, x, w.t()), a.repeat)
            dnn = best_seconds(lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], ''), a.repeat)
            rows.append({'shape': [m, k, n], 'where': where, 'gflops_mkl': round(gflop / mkl, 1),
                         'gflops_onednn': round(gflop / dnn, 1)})
            print(f'{m}x{k}x{n:<6} {where:<30} torch.mm {gflop / mkl:6.1f}  oneDNN {gflop / dnn:6.1f} GFLOP/s')
    info = {'threads': a.threads, 'torch': torch.__version__, 'vendor': _cpu_vendor(),
            'capability': torch.backends.cpu.get_cpu_capability(), 'gemm_backend': cpu_kernels().gemm, 'rows': rows}
    print(f"vendor {info['vendor']}, capability {info['capability']}, viddet picks {info['gemm_backend']}")
    if a.out:
        with open(a.out, 'x') as f:
            json.dump(info, f, indent=1)


if __name__ == '__main__':
    main()
