"""The RESULTS.md tables of viddet vs MMTracking 0.14 on the parity clip, from saved benchmark runs.

MMTracking was timed on another machine (``../shared/parity/timing/mmtracking_2026-12-01.json``: an
idle 2-core AMD EPYC, AVX2). Two independent ways carry viddet's times measured here over to that
machine; a claim holds only if it holds under both:

* **calibration**: viddet here x (torchvision ResNet-50 there / the same workload here), at the same
  thread count (``bench_clip.py``'s ``viddet_normalised``);
* **same-code anchor**: the fixture also holds viddet at commit f37ccc7 timed in MMTracking's session,
  so viddet now there ~ f37ccc7 there x (viddet now here / f37ccc7 here), both timed here with AVX2
  kernels only (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``), as
  on that machine. It uses medians only (the fixture gives f37ccc7's median and mean).

    python benchmarks/clip_table.py benchmarks/results/clip_t1.json benchmarks/results/clip_t2.json \\
        --avx2 benchmarks/results/clip_avx2_t1.json benchmarks/results/clip_avx2_t2.json \\
        --old-avx2 benchmarks/results/clip_f37ccc7_avx2_t1.json benchmarks/results/clip_f37ccc7_avx2_t2.json \\
        --roofline benchmarks/results/roofline_t1.json benchmarks/results/roofline_t2.json

The ``clip_*.json`` files are ``bench_clip.py --out``; the ``clip_f37ccc7_*`` ones are the
``benchmarks/bench_clip.py`` of commit f37ccc7 run on that commit's code.

Where MMTracking itself was timed on the same machine in the same session
(``mmtracking_clip.py --out``), no carrying over is needed: ``--side-by-side`` prints viddet's
times here next to MMTracking's here, and nothing else (with several runs of each, interleaved,
the spread between runs and the ratio over every pairing).

    python benchmarks/clip_table.py benchmarks/results/clip_zen1_t{1,2}.json \\
        --side-by-side benchmarks/results/mmtracking_zen1_*.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ORDER = ['single', 'dff', 'fgfa', 'selsa', 'troi']
FIXTURE = Path(__file__).resolve().parents[2] / 'shared' / 'parity' / 'timing' / 'mmtracking_2026-12-01.json'


def _median(row: dict) -> float:
    if 'viddet_here' in row:
        return row['viddet_here']['median']
    return row['viddet_median']   # f37ccc7's bench_clip.py


def _by_method(paths):
    out = {}
    for p in paths or []:
        d = json.loads(Path(p).read_text())
        for row in d['results']:
            out[(row['method'], d['threads'])] = row
    return out


def side_by_side(run_paths, mm_paths) -> None:
    """The direct table: viddet (``bench_clip.py``: decode + model) against MMTracking
    (``mmtracking_clip.py``: model time only) timed on one machine, minutes apart.

    Every file is one run (of each method it holds); several runs of the same method and thread
    count, interleaved in time, measure the machine's run-to-run noise: each framework's runs are
    listed with their spread (slowest / fastest median - 1), and the ratio MMTracking / viddet is
    given over every pairing of a MMTracking run with a viddet run (min-max of the medians'
    ratios). Where each run carries the calibration workload timed just before it
    (``calibration_here_s``, ``calibration_before_s``), the ratio is also given with each median
    divided by its calibration time, which takes out a VM's drift between runs."""
    now, mm = {}, {}
    for p in run_paths:
        d = json.loads(Path(p).read_text())
        for row in d['results']:
            now.setdefault((row['method'], d['threads']), []).append((row, d.get('calibration_here_s')))
    for p in mm_paths:
        d = json.loads(Path(p).read_text())
        mm.setdefault((d['method'], d['threads']), []).append(d)

    def band(values, fmt='{:.2f}'):
        lo, hi = min(values), max(values)
        return fmt.format(lo) if len(values) == 1 or abs(hi - lo) < 5e-3 else f'{fmt.format(lo)}–{fmt.format(hi)}'

    def spread(values):
        return f'{100 * (max(values) / min(values) - 1):.0f}%' if len(values) > 1 else '–'

    print('| method | threads | MMTracking runs: median s/frame | its spread | viddet runs: median s/frame | its spread | '
          'ratio (every pairing) | ratio normalised by calibration | reference detections: MMTracking / viddet |')
    print('|---|---|---|---|---|---|---|---|---|')
    for key in sorted(set(now) | set(mm), key=lambda k: (k[1], ORDER.index(k[0]) if k[0] in ORDER else 99)):
        vs, ms = now.get(key, []), mm.get(key, [])
        v_med = [r['viddet_here']['median'] for r, _ in vs]
        m_med = [d['median'] for d in ms]
        cells = [key[0], str(key[1])]
        cells += [', '.join(f'{x:.2f}' for x in m_med) or '–', spread(m_med) if m_med else '–']
        cells += [', '.join(f'{x:.2f}' for x in v_med) or '–', spread(v_med) if v_med else '–']
        ratios = [m / v for m in m_med for v in v_med]
        cells.append(band(ratios, '{:.2f}×') if ratios else '–')
        norm = [(d['median'] / d['calibration_before_s']) / (r['viddet_here']['median'] / c)
                for d in ms if d.get('calibration_before_s') for r, c in vs if c]
        cells.append(band(norm, '{:.2f}×') if norm else '–')
        hits = ', '.join(f"{d['reference_detections_reproduced'][0]}/{d['reference_detections_reproduced'][1]}"
                         for d in ms if d.get('reference_detections_reproduced')) or '–'
        cells.append(f"{hits} / {', '.join(r['reproduced'] for r, _ in vs) or '–'}")
        print('| ' + ' | '.join(cells) + ' |')


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('runs', nargs='+', help='bench_clip.py --out files (native kernels)')
    ap.add_argument('--avx2', nargs='*', default=[], help='bench_clip.py --out files run with AVX2 kernels only')
    ap.add_argument('--old-avx2', nargs='*', default=[], help="f37ccc7's bench_clip.py files, AVX2 kernels only")
    ap.add_argument('--roofline', nargs='*', default=[], help='roofline.py --out files: also print their table')
    ap.add_argument('--side-by-side', nargs='*', default=None,
                    help='mmtracking_clip.py --out files timed beside the runs: print only the direct table')
    ap.add_argument('--fixture', default=str(FIXTURE))
    args = ap.parse_args(argv)
    if args.side_by_side is not None:
        side_by_side(args.runs, args.side_by_side)
        return
    fixture = json.loads(Path(args.fixture).read_text())
    mm, old_there = fixture['seconds_per_frame'], fixture['viddet_same_session']
    now, avx2, old = _by_method(args.runs), _by_method(args.avx2), _by_method(args.old_avx2)

    print('| method | threads | MMTracking median (mean) | viddet, calibrated: median (mean) | ratio | '
          'viddet, same-code anchor: median | ratio | run-to-run spread |')
    print('|---|---|---|---|---|---|---|---|')
    for (method, threads), row in sorted(now.items(), key=lambda kv: (kv[0][1], ORDER.index(kv[0][0]) if kv[0][0] in ORDER else 99)):
        key = f'{method}_threads_{threads}'
        spread = max(abs(s) for s in row['run_spread']) if row.get('run_spread') else None
        cal = row['viddet_normalised']
        cells = [method, str(threads)]
        if key in mm:
            cells.append(f"{statistics.median(mm[key]):.2f} ({statistics.mean(mm[key]):.2f})")
        else:
            cells.append('–')
        cells.append(f"{cal['median']:.2f} ({cal['mean']:.2f})")
        cells.append(f"{statistics.median(mm[key]) / cal['median']:.2f}× ({statistics.mean(mm[key]) / cal['mean']:.2f}×)"
                     if key in mm else '–')
        if key in old_there and (method, threads) in avx2 and (method, threads) in old:
            est = old_there[key]['median'] * _median(avx2[(method, threads)]) / _median(old[(method, threads)])
            cells += [f'{est:.2f}', f'{statistics.median(mm[key]) / est:.2f}×']
        else:
            cells += ['–', '–']
        cells.append(f'±{100 * spread:.0f}%' if spread is not None else '–')
        print('| ' + ' | '.join(cells) + ' |')

    print()
    print('| method | threads | here, native kernels: median s/frame | here, AVX2 kernels | f37ccc7 here, AVX2 kernels | '
          'now / f37ccc7 (AVX2) |')
    print('|---|---|---|---|---|---|')
    for (method, threads), row in sorted(avx2.items(), key=lambda kv: (kv[0][1], ORDER.index(kv[0][0]) if kv[0][0] in ORDER else 99)):
        o = old.get((method, threads))
        n = now.get((method, threads))
        cells = [method, str(threads), f'{_median(n):.2f}' if n else '–', f'{_median(row):.2f}',
                 f'{_median(o):.2f}' if o else '–', f'{_median(row) / _median(o):.2f}' if o else '–']
        print('| ' + ' | '.join(cells) + ' |')

    if args.roofline:
        print()
        print('| method | threads | GFLOP per frame | peak GFLOP/s | roofline s/frame | measured s/frame | fraction |')
        print('|---|---|---|---|---|---|---|')
        for p in args.roofline:
            d = json.loads(Path(p).read_text())
            for row in sorted(d['results'], key=lambda r: ORDER.index(r['method']) if r['method'] in ORDER else 99):
                # DFF: FLOPs of its 1-in-10 key-frame mix against the mean over the clip (roofline.py)
                gflop = row.get('gflop_per_frame_mix', row['gflop_per_frame'])
                seconds = row.get('mean_s', row['steady_median_s'])
                print(f"| {row['method']} | {d['threads']} | {gflop:.0f} | {d['peak_gflops']['peak']:.0f} | "
                      f"{row['roofline_s']:.2f} | {seconds:.2f} | {100 * row['fraction']:.0f}% |")


if __name__ == '__main__':
    main()
