"""Make the training-parity fixtures of ``tests/fixtures/train_parity/`` (or any list of cases).

Runs ``train_stages.py`` (MMTracking 0.14: run this with the MMTracking environment's python, see
``README.md``) once per case, each in its own process, with the checkpoint that
``make_checkpoint.py keys/<method>_r50.txt --seed N`` writes (made in a temporary folder, one at a
time, deleted when the next one is needed).

usage: python make_train_set.py DATA_DIR PARITY_DIR OUT_DIR [--only NAME ...] [--list]
  DATA_DIR    the mini_vid folder (``../shared/data/mini_vid``): Data/VID/... and Annotations/VID/...
  PARITY_DIR  the folder with make_checkpoint.py and keys/ (``../shared/parity``)
  OUT_DIR     where <name>.json go (existing files are remade)
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (method, snippet folder under Data/VID, key frame, reference frames, checkpoint seed, RNG seed, still)
# A still case (an ImageNet DET-like image) takes copies of the key as references (``--still``).
CASES = {
    # remakes of ../shared/parity/train/*.json (same inputs), with the intermediate stages
    'dff_bear_k10': ('dff', 'train/DAVIS16_bear', 10, [4], 0, 0, False),
    'dff_bear_k10_still': ('dff', 'train/DAVIS16_bear', 10, [10], 0, 3, True),
    'fgfa_bear_k10': ('fgfa', 'train/DAVIS16_bear', 10, [4, 17], 0, 0, False),
    'selsa_bear_k10': ('selsa', 'train/DAVIS16_bear', 10, [4, 17], 0, 0, False),
    'troi_bear_k10': ('troi', 'train/DAVIS16_bear', 10, [4, 17], 0, 0, False),
    # other snippets, checkpoint seeds 1-3, RNG seeds 3/5/7/11
    'dff_cows_k12_c1_r5': ('dff', 'train/DAVIS16_cows', 12, [5], 1, 5, False),
    'dff_dog_k20_still_c2_r7': ('dff', 'train/DAVIS16_dog', 20, [20], 2, 7, True),
    'dff_elephant_k30_c3_r11': ('dff', 'train/DAVIS16_elephant', 30, [36], 3, 11, False),
    'dff_libby_k8_still_c1_r3': ('dff', 'val/DAVIS16_libby', 8, [8], 1, 3, True),
    'dff_boat_k15_c2_r5': ('dff', 'train/DAVIS16_boat', 15, [20], 2, 5, False),
    'dff_bmx-trees_k25_still_c3_r5': ('dff', 'train/DAVIS16_bmx-trees', 25, [25], 3, 5, True),
    'fgfa_cows_k12_c2_r7': ('fgfa', 'train/DAVIS16_cows', 12, [5, 18], 2, 7, False),
    'fgfa_dog_k20_c1_r5': ('fgfa', 'train/DAVIS16_dog', 20, [13, 27], 1, 5, False),
    'fgfa_car-shadow_k9_still_c3_r3': ('fgfa', 'train/DAVIS16_car-shadow', 9, [9, 9], 3, 3, True),
    'fgfa_horsejump-high_k33_c1_r11': ('fgfa', 'train/DAVIS16_horsejump-high', 33, [26, 38], 1, 11, False),
    'fgfa_motorbike_k17_c2_r5': ('fgfa', 'train/DAVIS16_motorbike', 17, [10, 24], 2, 5, False),
    'selsa_cows_k12_c1_r5': ('selsa', 'train/DAVIS16_cows', 12, [6, 19], 1, 5, False),
    'selsa_elephant_k5_c2_r7': ('selsa', 'train/DAVIS16_elephant', 5, [0, 13], 2, 7, False),
    'selsa_libby_k30_still_c3_r11': ('selsa', 'val/DAVIS16_libby', 30, [30, 30], 3, 11, True),
    'selsa_boat_k27_c2_r3': ('selsa', 'train/DAVIS16_boat', 27, [20, 33], 2, 3, False),
    'selsa_bus_k10_c1_r7': ('selsa', 'train/DAVIS16_bus', 10, [2, 18], 1, 7, False),
    'troi_dog_k14_c2_r5': ('troi', 'train/DAVIS16_dog', 14, [7, 21], 2, 5, False),
    'troi_car-turn_k40_c1_r7': ('troi', 'val/DAVIS16_car-turn', 40, [33, 47], 1, 7, False),
    'troi_horsejump-high_k20_still_c3_r3': ('troi', 'train/DAVIS16_horsejump-high', 20, [20, 20], 3, 3, True),
    'troi_bmx-trees_k6_c2_r11': ('troi', 'train/DAVIS16_bmx-trees', 6, [0, 12], 2, 11, False),
    'troi_train_k22_c1_r5': ('troi', 'train/DAVIS16_train', 22, [15, 30], 1, 5, False),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data_dir')
    p.add_argument('parity_dir')
    p.add_argument('out_dir')
    p.add_argument('--only', nargs='+', help='make only these cases')
    p.add_argument('--list', action='store_true', help='print the cases and exit')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--spread-threads', type=int, default=1)
    a = p.parse_args()
    names = a.only or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f'unknown case(s): {unknown}; --list shows them')
    if a.list:
        for n in names:
            print(n, *CASES[n])
        return 0
    os.makedirs(a.out_dir, exist_ok=True)
    names.sort(key=lambda n: (CASES[n][0], CASES[n][4], n))   # one checkpoint at a time
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, made = None, None
        for n in names:
            method, snippet, key, refs, ckpt_seed, rng_seed, still = CASES[n]
            if made != (method, ckpt_seed):
                if ckpt:
                    os.remove(ckpt)
                ckpt = os.path.join(tmp, f'{method}_seed{ckpt_seed}.pth')
                subprocess.run([sys.executable, os.path.join(a.parity_dir, 'make_checkpoint.py'),
                                os.path.join(a.parity_dir, 'keys', f'{method}_r50.txt'), ckpt,
                                '--seed', str(ckpt_seed)], check=True)
                made = (method, ckpt_seed)
            cmd = [sys.executable, os.path.join(HERE, 'train_stages.py'), method,
                   os.path.join(a.data_dir, 'Data', 'VID', snippet),
                   os.path.join(a.data_dir, 'Annotations', 'VID', snippet),
                   ckpt, os.path.join(a.out_dir, f'{n}.json'), '--key', str(key), '--refs', *map(str, refs),
                   '--ckpt-seed', str(ckpt_seed), '--rng-seed', str(rng_seed),
                   '--threads', str(a.threads), '--spread-threads', str(a.spread_threads)]
            if still:
                cmd.append('--still')
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            print(f'{n}: {time.time() - t0:.0f} s {r.stdout.strip()}', flush=True)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr, flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
