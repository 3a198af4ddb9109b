"""SimOTA, the label assignment YOLOX trains with (Ge et al., "YOLOX: Exceeding YOLO Series in 2021",
arXiv 2107.08430, section 2.2), as the official YOLOV / YOLOV++ code computes it
(github.com/YuHengsss/YOLOV, ``yolox/models/yolovp_msa.py`` and ``v_plus_head.py``:
``get_assignments``, ``get_in_boxes_info``, ``dynamic_k_matching``). Written from those semantics.

For one frame with G ground-truth boxes and A anchors (grid cells of the three levels):

1. candidate anchors: those whose cell centre lies inside some ground-truth box or within
   ``radius`` strides of some box centre (YOLOV's code uses a radius of **4.5** strides, where YOLOX
   uses 2.5);
2. cost of (box g, candidate a): ``BCE(sqrt(sigmoid(cls_a) * sigmoid(obj_a)), onehot(class_g))``
   summed over classes + 3 · (−log(IoU + 1e-8)) + 100000 when the anchor is not both inside box g
   and within its centre radius;
3. dynamic k: each box takes the k candidates of lowest cost, k = max(1, int(sum of its 10 largest
   IoUs)); an anchor taken by several boxes keeps the one of lowest cost.

Every number is computed with the official code's operations in the same order, so that the
assignment (and the ties of ``torch.topk``) are the official ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

CENTER_RADIUS = 4.5
"""Centre-prior radius in strides (the YOLOV heads' ``center_radius``)."""
CANDIDATE_K = 10
"""Number of largest IoUs summed for a box's dynamic k."""


@dataclass
class Assignment:
    """SimOTA's result for one frame of A anchors and G boxes.

    Attributes:
        fg_mask: (A,) bool, the foreground anchors.
        matched_gt: (n_fg,) int64 index of each foreground anchor's box (anchor order).
        iou_targets: (n_fg,) IoU of each foreground anchor's predicted box with its box.
        dynamic_ks: (G,) int32 k of each box.
        num_candidates: anchors inside some box or centre region (the columns of the cost).
    """
    fg_mask: torch.Tensor
    matched_gt: torch.Tensor
    iou_targets: torch.Tensor
    dynamic_ks: torch.Tensor
    num_candidates: int

    @property
    def num_fg(self) -> int:
        return int(self.matched_gt.numel())

    @property
    def fg_anchors(self) -> torch.Tensor:
        """(n_fg,) int64 indices of the foreground anchors, ascending."""
        return torch.where(self.fg_mask)[0]


def anchor_grid(sizes: Sequence[Tuple[int, int]], strides: Sequence[int], dtype=torch.float32,
                device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell coordinates of every anchor: (gx (A,), gy (A,), stride (A,)) in level order, row-major
    within a level (the order of the heads' flattened outputs)."""
    gx, gy, st = [], [], []
    for (h, w), s in zip(sizes, strides):
        yv, xv = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
        gx.append(xv.reshape(-1))
        gy.append(yv.reshape(-1))
        st.append(torch.full((h * w,), float(s)))
    return tuple(torch.cat(t).to(dtype=dtype, device=device) for t in (gx, gy, st))


def pairwise_iou_cxcywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of (cx, cy, w, h) boxes, (n, 4) x (m, 4) -> (n, m) (official
    ``bboxes_iou(..., xyxy=False)``; disjoint boxes give 0)."""
    tl = torch.max(a[:, None, :2] - a[:, None, 2:] / 2, b[:, :2] - b[:, 2:] / 2)
    br = torch.min(a[:, None, :2] + a[:, None, 2:] / 2, b[:, :2] + b[:, 2:] / 2)
    area_a = torch.prod(a[:, 2:], 1)
    area_b = torch.prod(b[:, 2:], 1)
    overlap = (tl < br).to(tl.dtype).prod(dim=2)
    inter = torch.prod(br - tl, 2) * overlap
    return inter / (area_a[:, None] + area_b - inter)


def candidate_anchors(gt: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, stride: torch.Tensor,
                      radius: float = CENTER_RADIUS) -> Tuple[torch.Tensor, torch.Tensor]:
    """The anchors SimOTA considers for boxes ``gt`` (G, 4) (cx, cy, w, h, input pixels).

    Returns:
        (mask (A,) bool: the cell centre ``(g + 0.5) · stride`` is strictly inside some box or
        strictly within ``radius`` strides of some box centre; both (G, n) bool over the masked
        anchors: inside box g and within its centre radius).
    """
    xc = (gx * stride + 0.5 * stride)[None]
    yc = (gy * stride + 0.5 * stride)[None]
    cx, cy, w, h = (gt[:, i:i + 1] for i in range(4))
    in_box = torch.stack([xc - (cx - 0.5 * w), yc - (cy - 0.5 * h),
                          (cx + 0.5 * w) - xc, (cy + 0.5 * h) - yc], 2).min(dim=-1).values > 0.0
    r = radius * stride[None]
    in_centre = torch.stack([xc - (cx - r), yc - (cy - r), (cx + r) - xc, (cy + r) - yc], 2).min(dim=-1).values > 0.0
    mask = in_box.any(dim=0) | in_centre.any(dim=0)
    return mask, in_box[:, mask] & in_centre[:, mask]


def dynamic_k_matching(cost: torch.Tensor, ious: torch.Tensor, candidate_k: int = CANDIDATE_K):
    """SimOTA's matching of G boxes to n candidate anchors, cost and ious (G, n).

    Returns:
        (matched (n,) bool: the candidates that became foreground; matched_gt (n_fg,) int64;
        iou_targets (n_fg,); dynamic_ks (G,) int32).
    """
    matching = torch.zeros_like(cost)
    top = torch.topk(ious, min(candidate_k, ious.size(1)), dim=1).values
    ks = torch.clamp(top.sum(1).int(), min=1)
    for g in range(cost.shape[0]):
        matching[g][torch.topk(cost[g], k=int(ks[g]), largest=False).indices] = 1.0
    shared = matching.sum(0) > 1
    if shared.any():
        best = torch.min(cost[:, shared], dim=0).indices
        matching[:, shared] *= 0.0
        matching[best, shared] = 1.0
    matched = matching.sum(0) > 0.0
    matched_gt = matching[:, matched].argmax(0)
    iou_targets = (matching * ious).sum(0)[matched]
    return matched, matched_gt, iou_targets, ks


@torch.no_grad()
def simota_assign(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, boxes: torch.Tensor,
                  obj_logits: torch.Tensor, cls_logits: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor,
                  stride: torch.Tensor, radius: float = CENTER_RADIUS) -> Assignment:
    """SimOTA for one frame.

    Args:
        gt_boxes: (G, 4) boxes (cx, cy, w, h) in input pixels, G >= 1.
        gt_labels: (G,) 0-based classes (any dtype holding integers).
        boxes: (A, 4) predicted boxes (cx, cy, w, h), input pixels (decoded).
        obj_logits: (A,) objectness logits; cls_logits: (A, K) class logits.
        gx, gy, stride: (A,) the anchors' cells (:func:`anchor_grid`).

    Returns:
        :class:`Assignment` (no foreground when no anchor is a candidate).
    """
    num_classes = cls_logits.shape[1]
    mask, in_both = candidate_anchors(gt_boxes, gx, gy, stride, radius)
    n = int(mask.sum())
    fg_mask = torch.zeros_like(mask)
    if n == 0:
        empty = gt_boxes.new_zeros(0)
        return Assignment(fg_mask, empty.long(), empty, torch.zeros(len(gt_boxes), dtype=torch.int32), 0)
    ious = pairwise_iou_cxcywh(gt_boxes, boxes[mask])
    onehot = F.one_hot(gt_labels.to(torch.int64), num_classes).float()
    with torch.autocast(device_type=boxes.device.type, enabled=False):
        p = (cls_logits[mask].float().sigmoid() * obj_logits[mask].float()[:, None].sigmoid()).sqrt()
        g = len(gt_boxes)
        cls_cost = F.binary_cross_entropy(p[None].expand(g, -1, -1), onehot[:, None].expand(-1, n, -1),
                                          reduction='none').sum(-1)
    cost = cls_cost + 3.0 * -torch.log(ious + 1e-8) + 100000.0 * (~in_both)
    matched, matched_gt, iou_targets, ks = dynamic_k_matching(cost, ious)
    fg_mask[mask] = matched
    return Assignment(fg_mask, matched_gt, iou_targets, ks, n)
