"""Anchors, the delta box coder and NMS with MMTracking's exact arithmetic.

Sources: mmdet-2.x ``AnchorGenerator`` (``gen_single_level_base_anchors``, ``single_level_grid_priors``),
``DeltaXYWHBBoxCoder`` (``bbox2delta`` / ``delta2bbox``) and mmcv's ``batched_nms`` (``mmcv/ops/nms.py``).
Boxes are (x1, y1, x2, y2) in pixels with no +1 convention.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torchvision.ops import nms as _tv_nms

WH_RATIO_CLIP = 16 / 1000
MAX_LOG_RATIO = abs(math.log(WH_RATIO_CLIP))  # 4.1352: clamp of the dw/dh deltas


def base_anchors(stride: int = 16, scales: Sequence[float] = (4, 8, 16, 32),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> torch.Tensor:
    """The anchors of one feature-map location centred on (0, 0) (mmdet ``AnchorGenerator``).

    base_size = stride, center_offset = 0, scale_major = True: for ratio r, h_ratio = sqrt(r),
    w_ratio = 1 / h_ratio, w = stride * w_ratio * scale, h = stride * h_ratio * scale; the anchor is
    (-w/2, -h/2, w/2, h/2), unrounded. Ordered ratio-major: index = ratio_index * len(scales) + scale_index.

    Returns:
        (len(ratios) * len(scales), 4) float32 tensor, pixels.
    """
    scales_t = torch.tensor(scales, dtype=torch.float32)
    ratios_t = torch.tensor(ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def grid_anchors(base: torch.Tensor, feat_size: Tuple[int, int], stride: int = 16,
                 device=None) -> torch.Tensor:
    """All anchors of a (H, W) feature map, location-major (row y outer, x inner, A anchors inner).

    Args:
        base: (A, 4) anchors of one location (:func:`base_anchors`).
        feat_size: (H, W) of the feature map, cells.
        stride: feature stride, pixels; location (i, j) is shifted by (j * stride, i * stride).

    Returns:
        (H * W * A, 4) float32 tensor, pixels. Matches permuting an (A, H, W) head output to
        (H, W, A) and flattening.
    """
    h, w = feat_size
    base = base.to(device)
    shift_x = torch.arange(0, w, device=device, dtype=torch.float32) * stride
    shift_y = torch.arange(0, h, device=device, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
    shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=-1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


def decode_boxes(rois: torch.Tensor, deltas: torch.Tensor, stds: Sequence[float],
                 max_shape: Tuple[int, int] = None) -> torch.Tensor:
    """Applies (dx, dy, dw, dh) deltas to boxes (mmdet-2.x ``delta2bbox``, means 0).

    Args:
        rois: (N, 4) boxes, pixels.
        deltas: (N, 4 * K) deltas for K boxes per roi (K = 1 for the RPN, 30 for the R-CNN head).
        stds: the coder's 4 standard deviations ((1,1,1,1) RPN, (0.2,)*4 R-CNN).
        max_shape: (H, W) of the unpadded resized image; boxes are clipped to [0, W] x [0, H].

    Returns:
        (N, 4 * K) decoded boxes. dw, dh are clamped to +-log(1000/16) = +-4.135 before exp().
    """
    n = rois.shape[0]
    if n == 0:
        return deltas
    k = deltas.shape[1] // 4
    d = deltas.reshape(-1, 4) * deltas.new_tensor(stds).view(1, 4)
    r = rois.repeat(1, k).reshape(-1, 4)
    pxy = (r[:, :2] + r[:, 2:]) * 0.5
    pwh = r[:, 2:] - r[:, :2]
    gxy = pxy + pwh * d[:, :2]
    gwh = pwh * d[:, 2:].clamp(min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO).exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=max_shape[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=max_shape[0])
    return boxes.reshape(n, -1)


def encode_boxes(proposals: torch.Tensor, gt: torch.Tensor, stds: Sequence[float]) -> torch.Tensor:
    """Regression targets (dx, dy, dw, dh) / stds turning ``proposals`` into ``gt`` (mmdet ``bbox2delta``).

    Args:
        proposals, gt: (N, 4) boxes, pixels.
        stds: the coder's standard deviations.

    Returns:
        (N, 4) float32 targets: dx = (gx - px) / pw, dw = log(gw / pw), each divided by its std.
    """
    proposals = proposals.float()
    gt = gt.float()
    pxy = (proposals[:, :2] + proposals[:, 2:]) * 0.5
    pwh = proposals[:, 2:] - proposals[:, :2]
    gxy = (gt[:, :2] + gt[:, 2:]) * 0.5
    gwh = gt[:, 2:] - gt[:, :2]
    d = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
    return d / d.new_tensor(stds).view(1, 4)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with mmcv's processing order (mmcv 1.7 ``mmcv/ops/csrc/pytorch/cpu/nms.cpp``,
    ``nms_cpu``).

    mmcv visits the boxes in the order of ``scores.sort(0, descending=True)``, torch's default
    (unstable) sort, while ``torchvision.ops.nms`` sorts stably. The two differ only among boxes
    of exactly equal score, but such ties are common for float32 sigmoid scores near 1, and the
    order decides which of two tied overlapping boxes survives and where a box lands in the
    returned list (the training RoI sampler draws proposals by list position). So the order is
    taken from torch's own sort, as mmcv does, and torchvision's kernel (stable, hence keeping
    that order) does the suppression with the same float32 IoU arithmetic (IoU > threshold
    suppresses).

    Args:
        boxes: (N, 4) float32 (x1, y1, x2, y2), pixels. scores: (N,).
        iou_threshold: IoU above which the lower-ranked box is suppressed.

    Returns:
        (K,) int64 indices of the kept boxes, in visiting (decreasing score) order.
    """
    if boxes.numel() == 0:
        return torch.zeros((0,), dtype=torch.int64, device=boxes.device)
    order = scores.sort(descending=True)[1]
    return order[_tv_nms(boxes[order], scores[order], iou_threshold)]


PER_CLASS_NMS_FROM = 10000  # mmcv batched_nms ``split_thr``: from this many boxes on, NMS class by class


def class_offset_boxes(boxes: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
    """mmcv ``batched_nms``'s trick: (N, 4) boxes shifted by idx * (boxes.max() + 1) along both
    axes, so that boxes of different ``idxs`` (N,) never overlap; same dtype, pixels."""
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return boxes + offsets[:, None]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Class-aware NMS with mmcv's coordinate-offset trick (used below 10000 boxes).

    Boxes of different ``idxs`` never suppress each other: each group is shifted by
    idx * (boxes.max() + 1) and one NMS runs over all of them, exactly as mmcv ``batched_nms``
    does, so the IoU arithmetic (and its rounding) matches. Above 10000 boxes mmcv runs NMS per
    class and re-sorts the kept boxes by score; the result is the same up to float rounding and
    this function does that too. Each NMS visits tied scores in mmcv's order (:func:`nms`).

    Args:
        boxes: (N, 4) pixels. scores: (N,). idxs: (N,) int group ids.
        iou_threshold: a box is suppressed when its IoU with a kept higher-scoring box is > this.

    Returns:
        (K,) int64 indices of kept boxes, sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros((0,), dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] < PER_CLASS_NMS_FROM:
        return nms(class_offset_boxes(boxes, idxs), scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for c in torch.unique(idxs):
        mask = (idxs == c).nonzero().view(-1)
        keep_mask[mask[nms(boxes[mask], scores[mask], iou_threshold)]] = True
    keep = keep_mask.nonzero().view(-1)
    return keep[scores[keep].argsort(descending=True)]
