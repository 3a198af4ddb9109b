"""MMTracking 0.14's own seconds per frame on the parity clip, for a side-by-side run with
``bench_clip.py`` on the same machine, minutes apart.

Runs MMTracking in its test mode exactly as ``../shared/parity/ref_*.json`` were made: its R-50
config of each method (``mmtrack/.mim/configs/vid/...``: 1000x600 resize, FGFA's +-15 window with
stride 1, SELSA's and TRoI's 14 adaptive-stride references; ``single`` is DFF with
``key_frame_interval=1``), its ``ImagenetVIDDataset`` over a one-video COCO-VID annotation file of
the 12 frames of ``clips/vid7010_first12`` (written to a temporary file), and the ``make_checkpoint.py
--seed 0`` checkpoints. Each frame is timed around ``model(return_loss=False, rescale=True, **data)``
only: model time, no decode or preprocessing (``bench_clip.py`` includes both for viddet). Every
reference detection is then looked for in MMTracking's output with the parity rule (same class,
IoU >= 0.99, |score difference| <= 1e-3), which shows the run really is that test mode.

This script needs an environment with MMTracking 0.14.0, mmdet 2.28.x and mmcv-full 1.7.x (with
its CPU ops) that the user provides; viddet does not depend on any of them. Where no torchvision
matching that environment's torch can be installed, a stand-in package is enough that provides
``torchvision.models`` (empty) and ``torchvision.transforms.functional`` with a ``normalize``
function (mmtrack's STARK tracker imports it when ``mmtrack.models`` loads): the VID test path
imports them but uses neither.

    python benchmarks/mmtracking_clip.py fgfa --threads 1 --out mm_fgfa_t1.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'parity'
CONFIGS = {'single': 'dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid.py',
           'dff': 'dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid.py',
           'fgfa': 'fgfa/fgfa_faster_rcnn_r50_dc5_1x_imagenetvid.py',
           'selsa': 'selsa/selsa_faster_rcnn_r50_dc5_1x_imagenetvid.py',
           'troi': 'temporal_roi_align/selsa_troialign_faster_rcnn_r50_dc5_7e_imagenetvid.py'}
CHECKPOINT_KEYS = {'single': 'dff_r50', 'dff': 'dff_r50', 'fgfa': 'fgfa_r50', 'selsa': 'selsa_r50', 'troi': 'troi_r50'}


def box_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes in pixels."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def count_reproduced(detections, reference) -> int:
    """How many reference detections have a match (same class, IoU >= 0.99, |score difference| <=
    1e-3) among ``detections`` [(label, box, score)], each detection used once."""
    used = [False] * len(detections)
    hit = 0
    for ref in reference:
        for j, (label, box, score) in enumerate(detections):
            if (not used[j] and label == ref['label'] and abs(score - ref['score']) <= 1e-3
                    and box_iou(box, ref['bbox']) >= 0.99):
                used[j] = True
                hit += 1
                break
    return hit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('method', choices=sorted(CONFIGS))
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--shared', default=str(SHARED))
    ap.add_argument('--ckpt-dir', default='/tmp/viddet_parity_ckpt', help='as bench_clip.py makes them')
    ap.add_argument('--out', help='write the times as JSON here (refuses to overwrite)')
    args = ap.parse_args()
    if args.out and Path(args.out).exists():
        raise SystemExit(f'{args.out} exists; not overwriting it')

    import torch
    torch.set_num_threads(args.threads)
    import cv2
    cv2.setNumThreads(0)
    import mmtrack
    from mmcv import Config
    from mmcv.parallel import MMDataParallel
    from mmcv.runner import load_checkpoint
    from mmtrack.datasets import ImagenetVIDDataset, build_dataloader, build_dataset
    from mmtrack.models import build_model

    shared = Path(args.shared)
    clip = shared / 'clips' / 'vid7010_first12'
    frames = sorted(clip.glob('*.JPEG'))
    ann = {'videos': [{'id': 1, 'name': clip.name}],
           'images': [{'id': i + 1, 'video_id': 1, 'frame_id': i, 'file_name': f.name, 'height': 720,
                       'width': 1280, 'is_vid_train_frame': False} for i, f in enumerate(frames)],
           'annotations': [],
           'categories': [{'id': i + 1, 'name': n} for i, n in enumerate(ImagenetVIDDataset.CLASSES)]}
    ann_file = tempfile.NamedTemporaryFile('w', suffix='.json', delete=False)
    json.dump(ann, ann_file)
    ann_file.close()

    cfg = Config.fromfile(str(Path(mmtrack.__file__).parent / '.mim' / 'configs' / 'vid' / CONFIGS[args.method]))
    if args.method == 'single':
        cfg.model.test_cfg = dict(key_frame_interval=1)
    cfg.data.test.ann_file = ann_file.name
    cfg.data.test.img_prefix = str(clip)
    cfg.data.test.test_mode = True
    if 'motion' in cfg.model:            # no pretrained downloads: the checkpoint holds every weight
        cfg.model.motion.pop('init_cfg', None)
    cfg.model.detector.backbone.init_cfg = None
    dataset = build_dataset(cfg.data.test)
    loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=0, dist=False, shuffle=False)
    model = build_model(cfg.model)
    load_checkpoint(model, str(Path(args.ckpt_dir) / f'{CHECKPOINT_KEYS[args.method]}_seed0.pth'), map_location='cpu')
    model = MMDataParallel(model.eval(), device_ids=None)
    reference = json.loads((shared / f'ref_{args.method}_vid7010_first12_seed0.json').read_text())['frames']

    times, hit, total = [], 0, 0
    for i, data in enumerate(loader):
        with torch.no_grad():
            t0 = time.perf_counter()
            result = model(return_loss=False, rescale=True, **data)
            times.append(time.perf_counter() - t0)
        dets = [(c, [float(v) for v in row[:4]], float(row[4]))
                for c, rows in enumerate(result['det_bboxes']) for row in rows]
        hit += count_reproduced(dets, reference[i]['detections'])
        total += len(reference[i]['detections'])
        print(f'frame {i}: {times[-1]:.2f} s', flush=True)
    out = {'what': f'MMTracking {mmtrack.__version__} test mode, {args.method} R-50, parity clip, model time per frame',
           'method': args.method, 'threads': args.threads, 'torch': torch.__version__,
           'seconds_per_frame': [round(t, 3) for t in times], 'median': round(statistics.median(times), 3),
           'mean': round(statistics.mean(times), 3), 'reference_detections_reproduced': [hit, total]}
    print(json.dumps(out))
    if args.out:
        with open(args.out, 'x') as f:
            json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
