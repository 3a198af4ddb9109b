"""The official YOLOV training augmentation of a few real frames, for ``tests/test_yolov_augment.py``.

Runs the official code (github.com/YuHengsss/YOLOV at fe777cbe, unmodified) from the root of its
tree: ``VIDDataset.pull_item`` (the frame resized, the XML boxes clipped and scaled) then
``TrainTransform(max_labels=50, flip_prob=F, hsv_prob=1.0)`` with F = 0 or 1 (the flip decided), the
HSV gains drawn from ``np.random`` seeded per case; and ``augment_hsv`` alone on a 16 x 16 palette of
extreme colours (hue near 0 and 179, saturation and value at 0 and 255). The uniform numbers and the
keep bits of each case are the ones the seeded ``np.random`` gives (drawn again here, in the official
order), so that viddet can be fed the same draws.

Usage (the official environment, from the official tree's root):
    python tools/parity/yolov_augment.py MINI_VID_ROOT OUT.npz
"""
import os
import random
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, os.getcwd())

from yolox.data.data_augment import TrainTransform, augment_hsv  # noqa: E402
from yolox.data.datasets.vid import VIDDataset  # noqa: E402

SIZE = 64
# (frame under Data/VID/train, numpy seed of the HSV gains, flip)
CASES = [('DAVIS16_cows/000000.JPEG', 7, 1), ('DAVIS16_cows/000000.JPEG', 24, 0),
         ('DAVIS16_bus/000005.JPEG', 1, 1), ('DAVIS16_bus/000005.JPEG', 15, 0)]
PALETTE_SEEDS = [7, 24, 1, 15, 9]


def official_draws(seed):
    """The uniform numbers (3,) and keep bits (3,) ``augment_hsv`` draws after ``np.random.seed(seed)``."""
    np.random.seed(seed)
    uniform = np.random.uniform(-1, 1, 3)
    keep = np.random.randint(0, 2, 3)
    return uniform, keep


def palette():
    """16 x 16 uint8 BGR: hues 0..179 around the wrap at full and half saturation, greys, extremes."""
    hsv = np.zeros((16, 16, 3), np.uint8)
    hue = np.array([0, 1, 2, 3, 4, 5, 6, 90, 173, 174, 175, 176, 177, 178, 179, 30], np.uint8)
    sat = np.array([255, 250, 240, 200, 128, 60, 20, 10, 5, 0, 255, 230, 255, 3, 128, 255], np.uint8)
    val = np.array([255, 250, 240, 200, 128, 60, 20, 10, 5, 0, 255, 255, 30, 255, 2, 100], np.uint8)
    hsv[..., 0] = hue[None, :]
    hsv[..., 1] = sat[:, None]
    hsv[..., 2] = np.roll(val, 5)[:, None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def main(root, out):
    root = Path(root)
    with tempfile.TemporaryDirectory() as tmp:
        seq = Path(tmp) / 'seq.npy'
        np.save(seq, np.array([[f'train/{c[0]}' for c in CASES]], dtype=object), allow_pickle=True)
        ds = VIDDataset(file_path=str(seq), img_size=(SIZE, SIZE), preproc=None, lframe=0, gframe=1,
                        dataset_pth=str(root / 'Data/VID'))
    record = {'size': np.array(SIZE), 'frames': np.array([c[0] for c in CASES])}
    for i, (frame, seed, flip) in enumerate(CASES):
        img, annos, _, _ = ds.pull_item(f'train/{frame}')
        uniform, keep = official_draws(seed)
        np.random.seed(seed)
        random.seed(0)
        image, labels = TrainTransform(max_labels=50, flip_prob=float(flip), hsv_prob=1.0)(img, annos, (SIZE, SIZE))
        assert np.array_equal(image, np.round(image)) and image.min() >= 0 and image.max() <= 255
        record[f'case{i}_seed'] = np.array(seed)
        record[f'case{i}_flip'] = np.array(flip)
        record[f'case{i}_uniform'] = uniform
        record[f'case{i}_keep'] = keep
        record[f'case{i}_image'] = image.transpose(1, 2, 0).astype(np.uint8)   # (S, S, 3) BGR
        record[f'case{i}_labels'] = labels[labels[:, 3] > 0]                   # class, cx, cy, w, h
    pal = palette()
    record['palette'] = pal
    for seed in PALETTE_SEEDS:
        uniform, keep = official_draws(seed)
        np.random.seed(seed)
        jittered = pal.copy()
        augment_hsv(jittered)
        record[f'palette_seed{seed}_uniform'] = uniform
        record[f'palette_seed{seed}_keep'] = keep
        record[f'palette_seed{seed}'] = jittered
    np.savez_compressed(out, **record)
    print(f'wrote {out}: {len(CASES)} frames, {len(PALETTE_SEEDS)} palette jitters')


if __name__ == '__main__':
    main(*sys.argv[1:3])
