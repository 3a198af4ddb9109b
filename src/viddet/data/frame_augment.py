"""YOLOX's per-frame training augmentation, as the YOLOV family trains with it: every frame of a sample
gets its own HSV jitter and its own horizontal flip (``TrainTransform`` with ``augment_hsv`` and
``_mirror`` in ``yolox/data/data_augment.py`` of github.com/YuHengsss/YOLOV at ``fe777cbe``; every
released YOLOV / YOLOV++ model: ``hsv_prob = 1.0``, ``flip_prob = 0.5``). Used by
:class:`viddet.data.video_dataset.VideoDataset` for a method whose ``per_frame_augment`` is True; the
Faster R-CNN methods keep MMTracking's one flip decision for all frames of a sample and no HSV.

Order, as officially: the frame is resized (the letterbox's resize), jittered in HSV, flipped, then
padded with grey 114. Here the jitter and the flip act on the image region (``meta.img_shape``) of the
letterboxed tensor, which is the same: the padding is neither jittered nor flipped, and the tensor
holds the raw 0..255 BGR pixels of the resized uint8 image (:func:`viddet.models.yolox.letterbox`).

A frame none of whose boxes has its shorter side over 1 pixel after the resize (a frame without boxes
included) is neither jittered nor flipped: officially ``TrainTransform`` returns such a frame as it
came (an empty frame before augmenting; otherwise its fallback to the un-augmented image).

Randomness: the sample's own ``random.Random`` (seeded per sample by the trainer: reproducible,
resumable, independent of workers), not the global numpy state. Every frame draws the same numbers
(:func:`draw_frame_augment`) whether it is augmented or not, so a frame's draws do not depend on the
boxes of the frames before it.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from viddet.structures import ImageMeta

HSV_GAINS = (5, 30, 30)
"""The largest hue, saturation and value shifts (``augment_hsv``'s hgain, sgain, vgain; OpenCV's
uint8 HSV: hue 0..179, saturation and value 0..255)."""


def draw_frame_augment(rng: random.Random, flip_prob: float, hsv_prob: float) -> Tuple[bool, Optional[np.ndarray]]:
    """One frame's random choices, drawn from ``rng`` in this order: whether to jitter (probability
    ``hsv_prob``), three uniform numbers in [-1, 1), three fair coins, whether to flip (probability
    ``flip_prob``).

    Returns:
        (flip, gains): gains is None without jitter, else (3,) int16 hue, saturation, value shifts:
        uniform(-1, 1) x :data:`HSV_GAINS`, each kept with probability 1/2 (else 0), truncated toward
        zero (the official ``astype(np.int16)``; -4.7 -> -4).
    """
    jitter = rng.random() < hsv_prob
    uniform = [rng.uniform(-1.0, 1.0) for _ in HSV_GAINS]
    keep = [rng.random() < 0.5 for _ in HSV_GAINS]
    flip = rng.random() < flip_prob
    if not jitter:
        return flip, None
    shifts = np.asarray(uniform, dtype=np.float64) * np.asarray(HSV_GAINS) * np.asarray(keep)
    return flip, shifts.astype(np.int16)


def hsv_jitter(image: np.ndarray, gains: Sequence[int]) -> np.ndarray:
    """An image shifted in OpenCV's HSV space: hue + gains[0] modulo 180, saturation + gains[1] and
    value + gains[2] clipped to 0..255, converted back (``augment_hsv`` with given gains).

    Args:
        image: (H, W, 3) uint8 BGR.
        gains: three integer shifts (hue, saturation, value).

    Returns:
        A new (H, W, 3) uint8 BGR image.

    Raises:
        ValueError: the image is not (H, W, 3) uint8.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'expected an (H, W, 3) uint8 BGR image, got {image.dtype} {image.shape}')
    hue, sat, val = (c.astype(np.int16) for c in cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV)))
    hue = np.mod(hue + int(gains[0]), 180)
    sat = np.clip(sat + int(gains[1]), 0, 255)
    val = np.clip(val + int(gains[2]), 0, 255)
    hsv = cv2.merge([hue.astype(np.uint8), sat.astype(np.uint8), val.astype(np.uint8)])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def has_usable_box(boxes: np.ndarray) -> bool:
    """Whether any of the (n, 4) x1, y1, x2, y2 boxes has its shorter side over 1 pixel (the boxes
    ``TrainTransform`` keeps)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return bool((np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) > 1).any())


def augment_frames(tensors: torch.Tensor, metas: Sequence[ImageMeta], boxes: Sequence[np.ndarray],
                   rng: random.Random, flip_prob: float, hsv_prob: float) -> None:
    """Jitters and flips each frame on its own, in place (see the module docstring).

    Args:
        tensors: (N, 3, S, S) float32 letterboxed frames, raw 0..255 BGR values in each frame's image
            region ``metas[i].img_shape`` (top-left).
        metas: the N frames' :class:`ImageMeta`; ``flip`` is set True on each flipped frame (the
            caller flips its boxes: :func:`viddet.data.sequence.placed_boxes`).
        boxes: N (n_i, 4) arrays, each frame's ground-truth boxes in its resized, unflipped pixels
            (they decide whether the frame is augmented at all).
        rng: the sample's random generator (:func:`draw_frame_augment` per frame, in frame order).
        flip_prob, hsv_prob: probabilities in [0, 1] (``data.flip_ratio``, ``data.hsv_prob``).

    Raises:
        ValueError: the counts of tensors, metas and boxes differ.
    """
    if not len(tensors) == len(metas) == len(boxes):
        raise ValueError(f'{len(tensors)} frames, {len(metas)} metas and {len(boxes)} box sets')
    for t, meta, b in zip(tensors, metas, boxes):
        flip, gains = draw_frame_augment(rng, flip_prob, hsv_prob)
        if not has_usable_box(b):
            continue
        h, w = meta.img_shape
        region = t[:, :h, :w]
        if gains is not None:
            pixels = region.permute(1, 2, 0).numpy().astype(np.uint8)
            region.copy_(torch.from_numpy(hsv_jitter(pixels, gains)).permute(2, 0, 1))
        if flip:
            region.copy_(region.flip(-1))
            meta.flip = True
