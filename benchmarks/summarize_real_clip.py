"""Summarise the 144-frame real-clip runs of ``benchmarks/real_clip.sh`` (issue #3 "done when").

For each ``<method>_<mode>`` it reads the demo's log (frames, seconds, s/frame), ``/usr/bin/time -v``
(wall time, peak RSS in MiB) and the JSON-lines detections, and checks:

* every frame has a record, in order, and the annotated MP4 exists;
* single and DFF (causal in both modes, so the first 12 frames of the 144-frame run are the
  12-frame parity clip's): the first 12 frames against MMTracking 0.14's reference detections
  (same class, IoU >= 0.99, |score diff| <= 1e-3; the JSON keeps 2 decimals of pixels and 4 of
  score, so boxes whose coordinates agree up to that rounding also match: a 0.4 px tall box clipped
  to the border cannot keep IoU >= 0.99 through it);
* online vs offline: the share of offline detections the online run reproduces exactly (single and DFF
  must be 100%: their online mode is the same computation), and, looser, the share of offline
  detections scoring >= 0.3 that online has with the same class at IoU >= 0.5 (FGFA, SELSA and TRoI
  aggregate other frames online, so their scores differ by design).

    python benchmarks/summarize_real_clip.py work_dirs/real_clip --out benchmarks/results/cpu_t1/real_clip.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from bench_clip import _match  # noqa: E402  (zero-area aware IoU >= 0.99 match)

PARITY = HERE.parents[2] / 'shared' / 'parity'
METHODS = ('single', 'dff', 'fgfa', 'selsa', 'troi')


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reproduced(ref: list[tuple], dets: list[tuple]) -> tuple[int, int]:
    """Greedy one-to-one matching of (label, score, box) lists: (matched, len(ref))."""
    used, hit = set(), 0
    for lab, score, box in ref:
        for j, (l2, s2, b2) in enumerate(dets):
            # the JSON rounds to 0.01 px, which alone breaks IoU >= 0.99 for the sub-pixel-tall boxes
            # clipped to the image border: coordinates equal up to that rounding also count
            same = _match(box, b2) or all(abs(a - b) <= 0.0051 for a, b in zip(box, b2))
            if j not in used and l2 == lab and abs(s2 - score) <= 1e-3 and same:
                used.add(j)
                hit += 1
                break
    return hit, len(ref)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def loosely_kept(ref: list[tuple], dets: list[tuple], min_score: float = 0.3) -> tuple[int, int]:
    """Detections of ``ref`` scoring >= min_score that ``dets`` has with the same class at IoU >= 0.5."""
    strong = [d for d in ref if d[1] >= min_score]
    return sum(any(l2 == lab and iou(box, b2) >= 0.5 for l2, _, b2 in dets) for lab, _, box in strong), len(strong)


def frame_dets(rec: dict) -> list[tuple]:
    return list(zip(rec['labels'], rec['scores'], rec['boxes']))


def time_stats(path: Path) -> dict:
    text = path.read_text()
    rss_kb = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', text).group(1))
    wall = re.search(r'Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)', text).group(1)
    secs = 0.0
    for part in wall.split(':'):
        secs = secs * 60 + float(part)
    status = int(re.search(r'Exit status: (\d+)', text).group(1))
    return {'peak_rss_mib': round(rss_kb / 1024, 1), 'process_wall_s': round(secs, 1), 'exit_status': status}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('run_dir', type=Path)
    ap.add_argument('--frames', type=int, default=144)
    ap.add_argument('--out', type=Path)
    args = ap.parse_args()
    rows = []
    for m in METHODS:
        recs = {}
        for mode in ('offline', 'online'):
            stem = args.run_dir / f'{m}_{mode}'
            if 'Exit status' not in (stem.with_suffix('.time').read_text()
                                     if stem.with_suffix('.time').exists() else ''):
                continue  # not run, or still running
            row = {'method': m, 'mode': mode, **time_stats(stem.with_suffix('.time'))}
            last = stem.with_suffix('.log').read_text().strip().splitlines()[-1]
            got = re.search(r'(\d+) frames in ([\d.]+) s \(([\d.]+) s/frame\)', last)
            if got:
                row.update(frames=int(got.group(1)), detect_s=float(got.group(2)), s_per_frame=float(got.group(3)))
            jl = stem.with_suffix('.jsonl')
            recs[mode] = read_jsonl(jl) if jl.exists() else []
            row['records_in_order'] = [r['frame'] for r in recs[mode]] == list(range(args.frames))
            row['video_written'] = stem.with_suffix('.mp4').exists()
            if m in ('single', 'dff'):
                ref = json.loads((PARITY / f'ref_{m}_vid7010_first12_seed0.json').read_text())['frames']
                hit = tot = 0
                for rf, rec in zip(ref, recs[mode]):
                    h, t = reproduced([(d['label'], d['score'], d['bbox']) for d in rf['detections']], frame_dets(rec))
                    hit, tot = hit + h, tot + t
                row['parity_first12'] = f'{hit}/{tot}'
            rows.append(row)
        if len(recs) == 2 and recs['offline'] and recs['online']:
            hit = tot = 0
            for a, b in zip(recs['offline'], recs['online']):
                h, t = reproduced(frame_dets(a), frame_dets(b))
                hit, tot = hit + h, tot + t
            keep = tot_keep = 0
            for a, b in zip(recs['offline'], recs['online']):
                h, t = loosely_kept(frame_dets(a), frame_dets(b))
                keep, tot_keep = keep + h, tot_keep + t
            for row in rows[-2:]:
                row['online_reproduces_offline'] = round(hit / max(tot, 1), 4)
                row['online_keeps_offline_iou50'] = round(keep / max(tot_keep, 1), 4)
    for r in rows:
        print(f"{r['method']:6s} {r['mode']:7s} {r.get('frames', '?'):>4} frames  {r.get('s_per_frame', '?'):>5} s/frame  "
              f"peak RSS {r['peak_rss_mib']:7.1f} MiB  exit {r['exit_status']}  in-order {r['records_in_order']}  "
              f"parity {r.get('parity_first12', '-')}  online==offline {r.get('online_reproduces_offline', '-')}  "
              f"online~offline {r.get('online_keeps_offline_iou50', '-')}")
    if args.out:
        args.out.write_text(json.dumps({'clip': 'ILSVRC2015_val_00007010 (144 frames, 1280x720 -> 1000x563)',
                                        'rows': rows}, indent=1) + '\n')


if __name__ == '__main__':
    main()
