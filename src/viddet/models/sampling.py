"""Assigning candidate boxes to ground truth and sampling them for training, with mmdet-2.x semantics.

The numbers are those of MMTracking's ``faster_rcnn_r50_dc5.py`` ``train_cfg`` (see
:class:`viddet.models.losses.DetectorTrainConfig`):

* :func:`max_iou_assign` — ``MaxIoUAssigner`` (RPN 0.7 / 0.3 / min_pos 0.3, R-CNN 0.5 / 0.5 / 0.5;
  ``match_low_quality=True``, ``gt_max_assign_all=True``, no ignore boxes).
* :func:`random_sample` — ``RandomSampler`` (RPN 256 @ 50 % positives; R-CNN 256 (DFF 512) @ 25 %
  with the ground-truth boxes prepended as proposals).

Boxes are (x1, y1, x2, y2) in resized-image pixels (no +1 convention).

Randomness: the sampler draws with ``torch.randperm`` from an optional ``torch.Generator`` so
that a training sample's RoI selection can be made a pure function of the sample (viddet's
trainer seeds one generator per sample; see :mod:`viddet.engine.train_set`). Without a generator it
uses torch's global RNG, like mmdet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchvision.ops import box_iou


@dataclass
class AssignerConfig:
    """``MaxIoUAssigner`` thresholds (IoU, unitless)."""
    pos_iou_thr: float
    neg_iou_thr: float
    min_pos_iou: float
    match_low_quality: bool = True


@dataclass
class SamplerConfig:
    """``RandomSampler``: ``num`` samples, at most ``num * pos_fraction`` positives."""
    num: int
    pos_fraction: float
    add_gt_as_proposals: bool


@dataclass
class AssignResult:
    """Outcome of :func:`max_iou_assign` for n boxes.

    Attributes:
        gt_inds: (n,) int64; 0 = negative, -1 = ignored (neither), k > 0 = positive for gt k-1.
        max_overlaps: (n,) float32, each box's largest IoU with any gt (0 when there is none).
        labels: (n,) int64 class of the assigned gt for positives, -1 elsewhere; None when no
            gt labels were given (RPN).
    """
    gt_inds: torch.Tensor
    max_overlaps: torch.Tensor
    labels: Optional[torch.Tensor]

    @property
    def num_gts(self) -> int:
        return int(self.gt_inds.max().clamp(min=0)) if self.gt_inds.numel() else 0


def max_iou_assign(bboxes: torch.Tensor, gt_bboxes: torch.Tensor, cfg: AssignerConfig,
                   gt_labels: Optional[torch.Tensor] = None) -> AssignResult:
    """mmdet-2.x ``MaxIoUAssigner.assign`` (``ignore_iof_thr=-1``, ``gt_max_assign_all=True``).

    In order: every box starts as ignored (-1); a box whose best IoU is in [0, neg_iou_thr) becomes
    negative (0); a box whose best IoU is >= pos_iou_thr becomes positive for its best gt; then,
    if ``match_low_quality``, for each gt i in order whose best IoU is >= min_pos_iou, *every* box
    reaching that best IoU is assigned to gt i (so a later gt wins ties).

    Args:
        bboxes: (n, >=4) candidate boxes (anchors or proposals; extra columns such as a score are
            ignored), pixels.
        gt_bboxes: (g, 4) ground-truth boxes, pixels.
        cfg: the thresholds.
        gt_labels: (g,) int64 labels, or None (RPN).

    Returns:
        :class:`AssignResult`. With no gt every box is negative; with no box, empty tensors.
    """
    bboxes = bboxes[:, :4].float()
    gt_bboxes = gt_bboxes[:, :4].float().to(bboxes.device)
    n, g = bboxes.shape[0], gt_bboxes.shape[0]
    device = bboxes.device
    if n == 0 or g == 0:
        gt_inds = torch.zeros((n,), dtype=torch.int64, device=device) if g == 0 else \
            torch.full((n,), -1, dtype=torch.int64, device=device)
        labels = None if gt_labels is None else torch.full((n,), -1, dtype=torch.int64, device=device)
        return AssignResult(gt_inds, bboxes.new_zeros((n,)), labels)
    overlaps = box_iou(gt_bboxes, bboxes)                       # (g, n)
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)         # per box
    gt_max_overlaps, _ = overlaps.max(dim=1)                    # per gt
    gt_inds = torch.full((n,), -1, dtype=torch.int64, device=device)
    gt_inds[(max_overlaps >= 0) & (max_overlaps < cfg.neg_iou_thr)] = 0
    pos = max_overlaps >= cfg.pos_iou_thr
    gt_inds[pos] = argmax_overlaps[pos] + 1
    if cfg.match_low_quality:
        for i in range(g):
            if gt_max_overlaps[i] >= cfg.min_pos_iou:
                gt_inds[overlaps[i, :] == gt_max_overlaps[i]] = i + 1
    labels = None
    if gt_labels is not None:
        labels = torch.full((n,), -1, dtype=torch.int64, device=device)
        p = gt_inds > 0
        labels[p] = gt_labels.to(device).long()[gt_inds[p] - 1]
    return AssignResult(gt_inds, max_overlaps, labels)


@dataclass
class SamplingResult:
    """Outcome of :func:`random_sample` (mmdet ``SamplingResult``).

    Attributes:
        pos_inds, neg_inds: sorted int64 indices into the (gt-prepended) candidate list.
        pos_bboxes (p, 4), neg_bboxes (q, 4): the sampled boxes, pixels.
        pos_gt_bboxes: (p, 4) the gt box of each positive.
        pos_gt_labels: (p,) labels of the positives (None for the RPN).
        pos_is_gt: (p,) bool, the positive is a gt box added as a proposal.
        num_gts: number of gt boxes prepended to the candidates (0 without add_gt_as_proposals).
    """
    pos_inds: torch.Tensor
    neg_inds: torch.Tensor
    pos_bboxes: torch.Tensor
    neg_bboxes: torch.Tensor
    pos_gt_bboxes: torch.Tensor
    pos_gt_labels: Optional[torch.Tensor]
    pos_is_gt: torch.Tensor
    num_gts: int

    @property
    def bboxes(self) -> torch.Tensor:
        """(p + q, 4) positives then negatives (the order of mmdet's sampled RoIs)."""
        return torch.cat([self.pos_bboxes, self.neg_bboxes], dim=0)


def _random_choice(gallery: torch.Tensor, num: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``num`` distinct elements of ``gallery`` drawn uniformly (mmdet ``RandomSampler.random_choice``:
    the first ``num`` entries of a random permutation)."""
    perm = torch.randperm(gallery.numel(), generator=generator)[:num].to(gallery.device)
    return gallery[perm]


def random_sample(assign: AssignResult, bboxes: torch.Tensor, gt_bboxes: torch.Tensor,
                  cfg: SamplerConfig, gt_labels: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> SamplingResult:
    """mmdet-2.x ``RandomSampler.sample`` (``neg_pos_ub=-1``).

    If ``cfg.add_gt_as_proposals`` and there are gt boxes, they are prepended to the candidates as
    positives of themselves (IoU 1). Then at most ``int(num * pos_fraction)`` positives are drawn
    (all of them when fewer), and ``num - #positives`` negatives (all when fewer). Index sets are
    returned sorted (mmdet applies ``unique()``).

    Args:
        assign: the :class:`AssignResult` of ``bboxes`` (not yet including the gt boxes).
        bboxes: (n, >=4) candidates, pixels. gt_bboxes: (g, 4).
        cfg: num / pos_fraction / add_gt_as_proposals.
        gt_labels: (g,) labels (R-CNN) or None (RPN).
        generator: torch RNG for the draws (None: global RNG).

    Returns:
        :class:`SamplingResult`.
    """
    bboxes = bboxes[:, :4].float()
    gt_bboxes = gt_bboxes[:, :4].float().to(bboxes.device)
    gt_inds, labels = assign.gt_inds, assign.labels
    num_gts = 0
    if cfg.add_gt_as_proposals and gt_bboxes.shape[0] > 0:
        num_gts = gt_bboxes.shape[0]
        bboxes = torch.cat([gt_bboxes, bboxes], dim=0)
        self_inds = torch.arange(1, num_gts + 1, dtype=torch.int64, device=bboxes.device)
        gt_inds = torch.cat([self_inds, gt_inds])
        if labels is not None:
            labels = torch.cat([gt_labels.to(bboxes.device).long(), labels])
    num_expected_pos = int(cfg.num * cfg.pos_fraction)
    pos_inds = torch.nonzero(gt_inds > 0, as_tuple=False).view(-1)
    if pos_inds.numel() > num_expected_pos:
        pos_inds = _random_choice(pos_inds, num_expected_pos, generator)
    pos_inds = pos_inds.unique()
    num_expected_neg = cfg.num - pos_inds.numel()
    neg_inds = torch.nonzero(gt_inds == 0, as_tuple=False).view(-1)
    if neg_inds.numel() > num_expected_neg:
        neg_inds = _random_choice(neg_inds, num_expected_neg, generator)
    neg_inds = neg_inds.unique()
    pos_assigned = gt_inds[pos_inds] - 1
    pos_gt_bboxes = gt_bboxes[pos_assigned] if gt_bboxes.shape[0] else bboxes.new_zeros((0, 4))
    is_gt = torch.zeros(bboxes.shape[0], dtype=torch.bool, device=bboxes.device)
    is_gt[:num_gts] = True
    return SamplingResult(pos_inds, neg_inds, bboxes[pos_inds], bboxes[neg_inds], pos_gt_bboxes,
                          None if labels is None else labels[pos_inds], is_gt[pos_inds], num_gts)
