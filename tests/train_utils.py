"""Helpers for the training tests: a tiny synthetic COCO-VID data set on disk and a tiny config.

The frames are 96x64 (w x h) PNGs with one or two filled rectangles per frame that move a few
pixels per frame; the annotation JSON follows the schema of ``viddet convert`` (MMTracking's COCO-VID JSON).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from viddet.config.training import config_from_dict

CLASSES = ['airplane', 'antelope', 'bear', 'bicycle', 'bird', 'bus', 'car', 'cattle', 'dog']


def make_tiny_vid(root: Path, num_videos: int = 2, num_frames: int = 5, width: int = 96, height: int = 64,
                  split: str = 'train') -> dict:
    """Writes ``root/Data/<split>/vid<k>/%06d.png`` and ``root/<split>.json``; returns the paths."""
    rng = np.random.default_rng(0)
    cats = [{'id': i + 1, 'name': n, 'encode_name': n} for i, n in enumerate(CLASSES)]
    videos, images, anns = [], [], []
    for v in range(num_videos):
        name = f'{split}/vid{v}'
        videos.append({'id': v + 1, 'name': name, 'vid_train_frames': list(range(num_frames))})
        x0, y0 = 10 + 8 * v, 8 + 4 * v
        color = [int(c) for c in rng.integers(30, 255, size=3)]
        cat = 7 if v % 2 == 0 else 9  # car / dog
        for f in range(num_frames):
            img = np.full((height, width, 3), 90, np.uint8)
            img[::4, :, :] = 60  # some texture
            x, y, w, h = x0 + 3 * f, y0 + f, 44, 36
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), color, -1)
            fn = f'{name}/{f:06d}.png'
            (root / 'Data' / fn).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / 'Data' / fn), img)
            img_id = len(images) + 1
            images.append({'file_name': fn, 'height': height, 'width': width, 'id': img_id, 'frame_id': f,
                           'video_id': v + 1, 'is_vid_train_frame': split == 'train'})
            anns.append({'id': len(anns) + 1, 'video_id': v + 1, 'image_id': img_id, 'category_id': cat,
                         'instance_id': v + 1, 'bbox': [x, y, w, h], 'area': w * h, 'iscrowd': False,
                         'occluded': False, 'generated': False})
    ann_file = root / f'{split}.json'
    ann_file.write_text(json.dumps({'categories': cats, 'videos': videos, 'images': images, 'annotations': anns}))
    return {'ann_file': str(ann_file), 'img_prefix': str(root / 'Data')}


def tiny_config(paths: dict, method: str = 'single', val: dict = None, **schedule):
    """A validated tiny config: MobileNetV2-lite (random init, said explicitly), 96x64 frames, few
    proposals/RoIs."""
    refs = {'single': None, 'dff': {'num_ref_imgs': 1, 'frame_range': 2, 'filter_key_img': False, 'method': 'uniform'}}
    ref = refs.get(method, {'num_ref_imgs': 2, 'frame_range': 2, 'filter_key_img': True, 'method': 'bilateral_uniform'})
    sched = dict(epochs=2, lr=0.01, lr_batch=1, warmup_iters=2, steps=[1], log_interval=1, seed=3)
    sched.update(schedule)
    raw = {
        'model': {'method': method, 'backbone': 'mobilenetv2', 'classes': CLASSES,
                  'rpn_train_proposals': 40, 'rcnn_samples': 16},
        'data': {'train': [dict(paths, load_as_video=True, ref_sampler=ref)], 'val': val,
                 'scale': [96, 64], 'workers': 0, 'samples_per_gpu': 1},
        'schedule': sched,
        'eval': {'interval': 0, 'at_end': val is not None},
        'init': {'backbone_weights': 'random', 'flownet_weights': 'random' if method in ('dff', 'fgfa') else None},
    }
    return config_from_dict(raw, '<tiny>')
