"""The shared preprocessing of a training sample's frames (a key frame and its references): one
resize and one flip decision for all, and the ground-truth boxes moved with the image
(MMTracking's ``SeqResize`` / ``SeqRandomFlip`` / ``SeqNormalize`` / ``SeqPad``, or a method's own
``train_transform``, e.g. YOLOV's letterbox). Used by :class:`viddet.data.video_dataset.VideoDataset`.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import cv2
import numpy as np
import torch

from viddet.data.transforms import DEFAULT_SCALE, normalize_pad, resize_keep_ratio
from viddet.errors import VidDetError
from viddet.structures import ImageMeta


def resize_boxes(boxes: np.ndarray, scale_factor: np.ndarray, img_shape: Tuple[int, int]) -> np.ndarray:
    """mmdet ``Resize._resize_bboxes``: (n, 4) x1y1x2y2 times [ws, hs, ws, hs], clipped to
    [0, W] x [0, H] of the resized image ``img_shape`` = (H, W). Returns float32."""
    b = boxes.astype(np.float32) * scale_factor.astype(np.float32)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, img_shape[1])
    b[:, 1::2] = np.clip(b[:, 1::2], 0, img_shape[0])
    return b


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """mmdet-2.x horizontal ``bbox_flip``: x1' = W - x2, x2' = W - x1 (no -1)."""
    f = boxes.copy()
    f[:, 0] = width - boxes[:, 2]
    f[:, 2] = width - boxes[:, 0]
    return f


def load_image(path) -> np.ndarray:
    """cv2 BGR uint8 (H, W, 3) image. Raises VidDetError naming the file if it cannot be read."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise VidDetError(f'{path}: frame missing or not a readable image')
    return img


def prepare_sequence(images: Sequence[np.ndarray], img_scale=DEFAULT_SCALE, flip: bool = False):
    """Shared-parameter train/test transform of a key image and its references.

    Every image is resized keeping its ratio to ``img_scale`` (uint8 cv2 bilinear, as
    :func:`viddet.data.transforms.resize_keep_ratio`), flipped horizontally if ``flip`` (one decision
    for all, MMTracking ``SeqRandomFlip(share_params=True)``), normalised and zero-padded to a
    multiple of 16. Images of different sizes are padded to the largest padded size so that they
    stack.

    Returns:
        (tensor (N, 3, Hp, Wp) float32, list of N :class:`ImageMeta`).
    """
    tensors, metas = [], []
    for img in images:
        h, w = img.shape[:2]
        resized, sf = resize_keep_ratio(img, img_scale)
        if flip:
            resized = np.ascontiguousarray(resized[:, ::-1])
        t = normalize_pad(resized)
        tensors.append(t)
        metas.append(ImageMeta(ori_shape=(h, w), img_shape=tuple(resized.shape[:2]), pad_shape=tuple(t.shape[1:]),
                               scale_factor=sf, flip=flip))
    hp = max(t.shape[1] for t in tensors)
    wp = max(t.shape[2] for t in tensors)
    if any(t.shape[1:] != (hp, wp) for t in tensors):
        out = torch.zeros((len(tensors), 3, hp, wp))
        for i, t in enumerate(tensors):
            out[i, :, :t.shape[1], :t.shape[2]] = t
            metas[i].pad_shape = (hp, wp)
        return out, metas
    return torch.stack(tensors), metas


def transform_sequence(images: Sequence[np.ndarray], transform: Callable, img_scale=DEFAULT_SCALE,
                       flip: bool = False):
    """A method's own preprocessing of a key image and its references (YOLOV: the letterbox):
    ``transform(image, img_scale) -> (tensor (3, S, S), ImageMeta)`` for each (all of one size),
    then, if ``flip``, the image
    region (``meta.img_shape``) of every tensor mirrored (one decision for all).

    Returns:
        (tensor (N, 3, S, S) float32, list of N :class:`ImageMeta`).
    """
    tensors, metas = [], []
    for img in images:
        t, meta = transform(img, img_scale)
        if flip:
            h, w = meta.img_shape
            t[:, :h, :w] = t[:, :h, :w].flip(-1)
            meta.flip = True
        tensors.append(t)
        metas.append(meta)
    return torch.stack(tensors), metas


def placed_boxes(boxes: np.ndarray, meta: ImageMeta, flip: bool) -> np.ndarray:
    """Original-image boxes in the preprocessed image: resized (:func:`resize_boxes`), flipped."""
    out = resize_boxes(boxes, meta.scale_factor, meta.img_shape)
    return flip_boxes(out, meta.img_shape[1]) if flip else out
