"""YOLOV / YOLOV++ on the CPU, the official code and viddet side by side in one process: the same
12 frames (``../shared/parity/clips/vid7010_first12``, one batch in which every frame attends to
all, as the official VID evaluation runs a video of fewer than 32 frames), the same seed-0
checkpoint (``../shared/parity/yolov/make_checkpoint.py``), the same thread count, the same input
tensor (viddet's letterbox, bit-exact to the official preprocessing: ``tests/test_yolov.py``).

For each model and thread count the two forwards alternate (A B B A ...), ``--repeat`` times each,
after one untimed warm-up call each; the table reports the median seconds per frame of the model
forward (the batch's time / 12, from the input tensor to the final detections, post-processing
included) and the ratio official / viddet of the medians, and of each adjacent pair (robust to a
machine whose load drifts). Every official call's detections are matched to viddet's by the
fixtures' rule (``oracle/compare.py``: IoU >= 0.99, |score difference| <= 1e-3, same class).

Run it with a Python that has both the official code's dependencies and viddet's (viddet from
``src/`` on ``PYTHONPATH``), from anywhere::

    PYTHONPATH=src python benchmarks/bench_yolov.py --official ../YOLOV \\
        --models yolov_s yolov_l --threads 1 2 --repeat 3 --out benchmarks/results/yolov_cpu.json

The official tree (github.com/YuHengsss/YOLOV, the commit of ``../shared/parity/yolov/README.md``)
is imported from ``--official``, not installed; its one CUDA-only line (two constant 0/1 matrices
built with ``.to('cuda')`` in ``yolox/models/post_trans.py``) is sent to the CPU during its calls,
as the fixtures' oracle does (no number changes). viddet runs as every command runs it: the fast
modules of ``viddet.speedups`` swapped in (``--plain``: the plain modules).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
EXPS = {'yolov_s': 'exps/yolov/yolov_s.py', 'yolov_l': 'exps/yolov/yolov_l.py',
        'yolovpp_s': 'exps/yolov++/v++_base_decoupleReg.py', 'yolovpp_l': 'exps/yolov++/v++_large_decoupleReg.py'}


@contextlib.contextmanager
def cuda_to_cpu():
    """``Tensor.to('cuda')`` -> CPU while the official code runs (its ``Attention_msa`` builds two
    constant matrices on 'cuda'); restored afterwards, so that viddet's calls never see it."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        def fix(a):
            if (isinstance(a, str) and a.startswith('cuda')) or (isinstance(a, torch.device) and a.type == 'cuda'):
                return 'cpu'
            return a
        if 'device' in kwargs:
            kwargs['device'] = fix(kwargs['device'])
        return original(self, *(fix(a) for a in args), **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


def checkpoint(model: str, ckpt_dir: Path, parity: Path) -> Path:
    """The seed-0 checkpoint of ``model``, made once with the fixtures' ``make_checkpoint.py``."""
    path = ckpt_dir / f'{model}_seed0.pth'
    if not path.exists():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(parity / 'make_checkpoint.py'), str(parity / 'keys' / f'{model}.txt'),
                        str(path), '--seed', '0'], check=True, stdout=subprocess.DEVNULL)
    return path


def official_model(tree: Path, model: str, ckpt: Path) -> torch.nn.Module:
    """The official ``exp.get_model()`` with the checkpoint loaded (strict), in eval mode."""
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    from yolox.exp import get_exp
    net = get_exp(str(tree / EXPS[model]), None).get_model()
    net.load_state_dict(torch.load(ckpt, map_location='cpu')['model'], strict=True)
    return net.eval()


def load_compare(parity: Path):
    spec = importlib.util.spec_from_file_location('yolov_compare', parity / 'oracle' / 'compare.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def as_frames(rows):
    """Per-frame (n, 7+) rows (x1, y1, x2, y2, obj, cls, label, ...) -> compare.py's (boxes, scores, labels)."""
    out = []
    for r in rows:
        r = torch.zeros((0, 7)) if r is None else r.double()
        out.append((r[:, :4].numpy(), (r[:, 4] * r[:, 5]).numpy(), r[:, 6].long().numpy()))
    return out


def clip_tensor(clip: Path) -> torch.Tensor:
    import cv2
    from viddet.models.yolox import letterbox
    files = sorted(p for p in clip.iterdir() if p.suffix.lower() in ('.jpeg', '.jpg', '.png'))
    return torch.stack([letterbox(cv2.imread(str(p)))[0] for p in files])


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn):
    """(wall seconds, CPU seconds of this process, fn()) of one call without autograd."""
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def bench_model(name: str, args, imgs: torch.Tensor, compare) -> list:
    from viddet import speedups
    from viddet.checkpoints.loading import load_model
    ckpt = checkpoint(name, args.ckpt_dir, args.parity)
    official = official_model(args.official, name, ckpt)
    ours = load_model(str(ckpt)).model.eval()
    ours = speedups.revert(ours) if args.plain else ours
    n = len(imgs)

    def run_official():
        with cuda_to_cpu():
            outputs, outputs_ori = official(imgs, lframe=0, gframe=n)
        return outputs if n > 4 else outputs_ori

    def run_ours():
        out = ours(imgs)
        return out.detections if n > 4 else out.still

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        timed(run_official), timed(run_ours)          # warm-up: oneDNN primitives, folded weights
        times = {'official': [], 'viddet': []}
        cpu = {'official': [], 'viddet': []}
        matched = total = 0
        for r in range(args.repeat):
            order = [('official', run_official), ('viddet', run_ours)]
            res = {}
            for key, fn in (order if r % 2 == 0 else order[::-1]):
                dt, dc, res[key] = timed(fn)
                times[key].append(dt / n)
                cpu[key].append(dc / n)
            m, t, _ = compare.match(as_frames(res['official']), as_frames(res['viddet']))
            matched, total = matched + m, total + t
        med = {k: statistics.median(v) for k, v in times.items()}
        pairs = [o / v for o, v in zip(times['official'], times['viddet'])]
        row = dict(model=name, threads=threads, frames=n, official_s_per_frame=times['official'],
                   viddet_s_per_frame=times['viddet'], official_median=med['official'],
                   viddet_median=med['viddet'], ratio_of_medians=med['official'] / med['viddet'],
                   pair_ratios=pairs, official_cpu_s_per_frame=cpu['official'], viddet_cpu_s_per_frame=cpu['viddet'],
                   cpu_ratio_of_medians=statistics.median(cpu['official']) / statistics.median(cpu['viddet']),
                   detections_matched=matched, detections_total=total,
                   viddet_modules=speedups.describe(ours))
        rows.append(row)
        print(f"{name} {threads} thread(s): official {med['official']:.3f} s/frame, viddet {med['viddet']:.3f} "
              f"s/frame, x{row['ratio_of_medians']:.2f} (pairs {' '.join(f'{p:.2f}' for p in pairs)}; CPU time "
              f"x{row['cpu_ratio_of_medians']:.2f}); "
              f"official detections reproduced {matched}/{total}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--official', type=Path, required=True, help='root of an official YOLOV tree')
    ap.add_argument('--models', nargs='+', default=['yolov_s', 'yolov_l'], choices=sorted(EXPS))
    ap.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    ap.add_argument('--repeat', type=int, default=3, help='timed calls of each implementation, alternating')
    ap.add_argument('--parity', type=Path, default=SHARED / 'parity' / 'yolov', help='the YOLOV fixtures')
    ap.add_argument('--clip', type=Path, default=SHARED / 'parity' / 'clips' / 'vid7010_first12')
    ap.add_argument('--ckpt-dir', type=Path, default=Path('/tmp/viddet_yolov_ckpt'))
    ap.add_argument('--plain', action='store_true', help="viddet's plain modules (no fast paths)")
    ap.add_argument('--out', type=Path, help='write every time and the machine description as JSON')
    args = ap.parse_args()
    args.official = args.official.resolve()
    from viddet.runtime import cpu_kernels
    imgs = clip_tensor(args.clip)
    compare = load_compare(args.parity)
    load = os.getloadavg()
    rows = [row for name in args.models for row in bench_model(name, args, imgs, compare)]
    record = dict(machine=dict(cpu=cpu_name(), cores=os.cpu_count(),
                               load_before=load, load_after=os.getloadavg()),
                  torch=torch.__version__, python=platform.python_version(), numpy=np.__version__,
                  cpu_kernels=cpu_kernels().as_dict(), official=args.official.name, rows=rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    print(f"load average before / after: {load[0]:.2f} / {record['machine']['load_after'][0]:.2f}")


if __name__ == '__main__':
    main()
