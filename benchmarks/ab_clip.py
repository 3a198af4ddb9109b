"""A/B of two viddet source trees on the parity clip, interleaved, for changes smaller than this
VM's drift (±10-20% over minutes): each run is a fresh process importing ``viddet`` from the given
``src`` folder (e.g. a ``git worktree`` of the base commit and the working tree), the two trees
alternate, and the seconds of frames 2..N+1 (after the first, which fills FGFA's window and SELSA's
references) are pooled per tree.

    git worktree add /tmp/base HEAD~1
    python benchmarks/ab_clip.py fgfa /tmp/base/src src --threads 1 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_clip import SHARED, checkpoint   # benchmarks/ is on the path of this script

CHILD = r'''
import sys, time, json, torch
sys.path.insert(0, sys.argv[1])
import viddet
assert viddet.__file__.startswith(sys.argv[1]), viddet.__file__
from viddet.checkpoints.loading import load_model
from viddet.data.image_sources import FolderSource
from viddet.engine.video import run_video
torch.set_num_threads(int(sys.argv[4]))
model = load_model(sys.argv[3], method=sys.argv[2]).model.eval()
out = []
with FolderSource(sys.argv[5]) as src:
    it = run_video(model, src, mode='offline')
    next(it)
    for i in range(int(sys.argv[6])):
        t = time.perf_counter(); next(it); out.append(time.perf_counter() - t)
    it.close()
print(json.dumps(out))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('method', choices=['single', 'dff', 'fgfa', 'selsa', 'troi'])
    ap.add_argument('src_a', help='the src/ folder of tree A (e.g. the base commit)')
    ap.add_argument('src_b', help='the src/ folder of tree B')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--repeat', type=int, default=3, help='runs per tree, alternating')
    ap.add_argument('--frames', type=int, default=6, help='timed frames per run (at most 11)')
    ap.add_argument('--ckpt-dir', default='/tmp/viddet_parity_ckpt')
    args = ap.parse_args()
    ckpt = checkpoint(args.method, Path(args.ckpt_dir), SHARED)
    trees = [str(Path(args.src_a).resolve()), str(Path(args.src_b).resolve())]
    times = {t: [] for t in trees}
    for r in range(args.repeat):
        for tree in trees:
            out = subprocess.run([sys.executable, '-c', CHILD, tree, args.method, str(ckpt), str(args.threads),
                                  str(SHARED / 'clips' / 'vid7010_first12'), str(min(args.frames, 11))],
                                 capture_output=True, text=True, check=True)
            ts = json.loads(out.stdout.strip().splitlines()[-1])
            times[tree] += ts
            print(f'run {r} {tree}: ' + ' '.join(f'{t:.3f}' for t in ts), flush=True)
    for tree, ts in times.items():
        print(f'{tree}: median {statistics.median(ts):.3f} s/frame, mean {statistics.mean(ts):.3f} ({len(ts)} frames)')


if __name__ == '__main__':
    main()
