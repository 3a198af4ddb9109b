"""Test-time preprocessing exactly as MMTracking's pipeline (the test pipelines of MMTracking 0.14's
``configs/_base_/datasets/imagenet_vid_{dff,fgfa}_style.py``: keep-ratio resize with
``mmcv.imrescale``, ``mmcv.imnormalize``, padding with ``size_divisor=16``, as mmdet-2.x
``Resize`` / ``Normalize`` / ``Pad`` and their ``Seq*`` versions do them).

cv2 bilinear resize of the *uint8* BGR image to fit (1000, 600) keeping the aspect ratio, then
RGB mean/std normalisation, then zero padding (after normalisation) to a multiple of 16. The uint8
rounding of the resize is part of the contract: MMTracking's test script resizes uint8 images, and
its detections change measurably if the resize runs on float32 instead.
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np
import torch

from viddet.structures import ImageMeta

IMG_MEAN_RGB = (123.675, 116.28, 103.53)
IMG_STD_RGB = (58.395, 57.12, 57.375)
DEFAULT_SCALE = (1000, 600)
SIZE_DIVISOR = 16


def rescale_size(width: int, height: int, scale: Tuple[int, int] = DEFAULT_SCALE) -> Tuple[int, int]:
    """Keep-ratio target size of ``mmcv.imrescale`` (long edge <= max(scale), short <= min(scale)).

    Args:
        width, height: original size in pixels.
        scale: (long_edge_limit, short_edge_limit) in pixels, in either order.

    Returns:
        (new_width, new_height) = (int(w*s + 0.5), int(h*s + 0.5)) with
        s = min(max(scale) / max(h, w), min(scale) / min(h, w)).
    """
    long_edge, short_edge = max(scale), min(scale)
    s = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(width * s + 0.5), int(height * s + 0.5)


def resize_keep_ratio(img: np.ndarray, scale: Tuple[int, int] = DEFAULT_SCALE):
    """Resizes an (H, W, 3) image with cv2 INTER_LINEAR keeping its dtype (uint8 stays uint8).

    Returns:
        (resized image, scale_factor float32 [w_s, h_s, w_s, h_s]).
    """
    h, w = img.shape[:2]
    new_w, new_h = rescale_size(w, h, scale)
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    scale_factor = np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    return resized, scale_factor


def normalize_pad(img: np.ndarray, size_divisor: int = SIZE_DIVISOR) -> torch.Tensor:
    """BGR (H, W, 3) image -> normalised RGB (3, Hp, Wp) float32 tensor, zero-padded bottom/right.

    Hp, Wp are H, W rounded up to a multiple of ``size_divisor`` pixels.
    """
    h, w = img.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).float()  # RGB, (H, W, 3)
    mean = torch.tensor(IMG_MEAN_RGB, dtype=torch.float32)
    inv_std = 1.0 / torch.tensor(IMG_STD_RGB, dtype=torch.float64)
    x = (x - mean) * inv_std.float()
    hp = -(-h // size_divisor) * size_divisor
    wp = -(-w // size_divisor) * size_divisor
    out = torch.zeros((3, hp, wp), dtype=torch.float32)
    out[:, :h, :w] = x.permute(2, 0, 1)
    return out


def preprocess(img_bgr: np.ndarray, scale: Tuple[int, int] = DEFAULT_SCALE,
               size_divisor: int = SIZE_DIVISOR) -> Tuple[torch.Tensor, ImageMeta]:
    """Full test pipeline for one decoded frame (MMTracking: Resize → Normalize → Pad).

    Args:
        img_bgr: (H, W, 3) uint8 BGR image as decoded by ``cv2.imread``.
        scale: resize limits (long, short) in pixels; default (1000, 600).
        size_divisor: pad to a multiple of this (16).

    Returns:
        (tensor (3, Hp, Wp) float32 normalised RGB, :class:`ImageMeta`).

    Raises:
        ValueError: if the image is not (H, W, 3).
    """
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3:
        raise ValueError(f'expected an (H, W, 3) BGR image, got shape {img_bgr.shape}')
    h, w = img_bgr.shape[:2]
    resized, scale_factor = resize_keep_ratio(img_bgr, scale)
    tensor = normalize_pad(resized, size_divisor)
    meta = ImageMeta(ori_shape=(h, w), img_shape=tuple(resized.shape[:2]),
                     pad_shape=tuple(tensor.shape[1:]), scale_factor=scale_factor)
    return tensor, meta
