"""Training targets and losses of the Faster R-CNN DC5 detector, with mmdet-2.x semantics.

Everything here follows the numbers of MMTracking's ``faster_rcnn_r50_dc5.py`` ``train_cfg``
(``configs/_base_/models/faster_rcnn_r50_dc5.py``) and the behaviour of the mmdet-2.x classes it names:

* assignment and sampling (``MaxIoUAssigner``, ``RandomSampler``): :mod:`viddet.models.sampling`.
* :func:`rpn_loss` — ``AnchorHead.loss`` for the RPN: anchors outside the image
  (``allowed_border=0``) are ignored; sigmoid cross-entropy on sampled anchors and SmoothL1
  (beta 1/9) on positives, both divided by ``max(#pos, 1) + max(#neg, 1)`` (``avg_factor``).
* :func:`rcnn_targets` / :func:`rcnn_loss` — ``BBoxHead.get_targets`` / ``BBoxHead.loss``:
  softmax cross-entropy with background as the LAST class, divided by the number of sampled RoIs;
  class-specific SmoothL1 (beta 1) on positives, divided by the number of sampled RoIs.

mmdet divides a summed loss by ``avg_factor + eps`` (eps = float32 machine epsilon); so does
this module. Boxes are (x1, y1, x2, y2) in resized-image pixels (no +1 convention).

Randomness: the ``generator`` arguments are passed on to the sampler (:mod:`viddet.models.sampling`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from viddet.models.boxes import encode_boxes
from viddet.models.sampling import AssignerConfig, SamplerConfig, SamplingResult, max_iou_assign, random_sample

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass
class DetectorTrainConfig:
    """The detector's ``train_cfg`` (MMTracking ``faster_rcnn_r50_dc5.py``).

    ``rpn_proposal`` is the proposal cfg used on the key frame during training (nms_pre 6000,
    NMS 0.7, 600 per image; DFF: 1000). Each method's ``train_config()`` gives its own.
    """
    rpn_assigner: AssignerConfig = field(default_factory=lambda: AssignerConfig(0.7, 0.3, 0.3))
    rpn_sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(256, 0.5, False))
    allowed_border: float = 0.0
    rpn_proposal_max_per_img: int = 600
    rpn_proposal_nms_pre: int = 6000
    rpn_proposal_nms_iou: float = 0.7
    rcnn_assigner: AssignerConfig = field(default_factory=lambda: AssignerConfig(0.5, 0.5, 0.5))
    rcnn_sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(256, 0.25, True))

    def rpn_proposal(self):
        """The training proposal settings as a :class:`viddet.models.detector.RPNConfig`."""
        from viddet.models.detector import RPNConfig
        return RPNConfig(nms_pre=self.rpn_proposal_nms_pre, max_per_img=self.rpn_proposal_max_per_img,
                         nms_iou=self.rpn_proposal_nms_iou, min_bbox_size=0.0)


# ----------------------------------------------------------------------------------- loss primitives
def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise SmoothL1 (mmdet ``smooth_l1_loss`` before reduction):
    0.5 d^2 / beta if d < beta else d - 0.5 beta, with d = |pred - target|."""
    d = (pred - target).abs()
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def anchor_inside_flags(anchors: torch.Tensor, img_shape: Tuple[int, int],
                        allowed_border: float = 0.0) -> torch.Tensor:
    """mmdet ``anchor_inside_flags``: (N,) bool, anchor lies within the unpadded resized image,
    x1 >= -b, y1 >= -b, x2 < W + b, y2 < H + b (b = allowed_border, pixels; b < 0 keeps all)."""
    if allowed_border < 0:
        return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    h, w = img_shape[:2]
    b = allowed_border
    return ((anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) &
            (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b))


# ----------------------------------------------------------------------------------- RPN
@dataclass
class RPNTargets:
    """Per-anchor RPN targets of one image (all H*W*A anchors, location-major).

    Attributes:
        labels: (N,) float32 objectness target (1 positive, 0 otherwise).
        label_weights: (N,) float32, 1 for sampled anchors, 0 otherwise (including outside ones).
        bbox_targets: (N, 4) deltas (stds 1) of positives, 0 elsewhere.
        bbox_weights: (N, 4) 1 for positives.
        num_pos, num_neg: sampled counts.
    """
    labels: torch.Tensor
    label_weights: torch.Tensor
    bbox_targets: torch.Tensor
    bbox_weights: torch.Tensor
    num_pos: int
    num_neg: int

    @property
    def avg_factor(self) -> int:
        """mmdet ``num_total_samples`` for one image: max(#pos, 1) + max(#neg, 1)."""
        return max(self.num_pos, 1) + max(self.num_neg, 1)


def rpn_targets(anchors: torch.Tensor, gt_bboxes: torch.Tensor, img_shape: Tuple[int, int],
                cfg: DetectorTrainConfig, generator: Optional[torch.Generator] = None) -> RPNTargets:
    """mmdet-2.x ``AnchorHead._get_targets_single`` for the RPN (no gt labels, ``unmap_outputs``).

    Only anchors inside the image (``allowed_border``) are assigned and sampled; the others get
    zero weight.

    Args:
        anchors: (N, 4) all anchors of the feature map, pixels.
        gt_bboxes: (g, 4) gt boxes in resized-image pixels.
        img_shape: (h, w) of the unpadded resized image, pixels.
    """
    n = anchors.shape[0]
    device = anchors.device
    labels = torch.zeros(n, device=device)
    label_weights = torch.zeros(n, device=device)
    bbox_targets = torch.zeros((n, 4), device=device)
    bbox_weights = torch.zeros((n, 4), device=device)
    inside = anchor_inside_flags(anchors, img_shape, cfg.allowed_border)
    inside_idx = inside.nonzero(as_tuple=False).view(-1)
    if inside_idx.numel() == 0:
        return RPNTargets(labels, label_weights, bbox_targets, bbox_weights, 0, 0)
    valid = anchors[inside_idx]
    assign = max_iou_assign(valid, gt_bboxes, cfg.rpn_assigner)
    res = random_sample(assign, valid, gt_bboxes, cfg.rpn_sampler, generator=generator)
    pos = inside_idx[res.pos_inds]
    neg = inside_idx[res.neg_inds]
    if pos.numel():
        bbox_targets[pos] = encode_boxes(res.pos_bboxes, res.pos_gt_bboxes, (1.0, 1.0, 1.0, 1.0))
        bbox_weights[pos] = 1.0
        labels[pos] = 1.0
        label_weights[pos] = 1.0
    label_weights[neg] = 1.0
    return RPNTargets(labels, label_weights, bbox_targets, bbox_weights, int(pos.numel()), int(neg.numel()))


def rpn_loss(cls_score: torch.Tensor, bbox_pred: torch.Tensor, targets: RPNTargets) -> Dict[str, torch.Tensor]:
    """RPN losses of one image (mmdet ``AnchorHead.loss_single`` with one level, one image).

    Args:
        cls_score: (1, A, h, w) objectness logits. bbox_pred: (1, 4A, h, w) deltas.
        targets: from :func:`rpn_targets` on the anchors of the same (h, w) map.

    Returns:
        {'loss_rpn_cls': sum of sigmoid BCE over sampled anchors / avg_factor,
         'loss_rpn_bbox': sum of SmoothL1(beta=1/9) over positives' 4 deltas / avg_factor},
        avg_factor = max(#pos, 1) + max(#neg, 1) (+ float32 eps).
    """
    a = cls_score.shape[1]
    logits = cls_score.float().permute(0, 2, 3, 1).reshape(-1)
    deltas = bbox_pred.float().permute(0, 2, 3, 1).reshape(-1, 4)
    if logits.shape[0] != targets.labels.shape[0]:
        raise ValueError(f'{logits.shape[0]} RPN outputs ({a} anchors per location) for '
                         f'{targets.labels.shape[0]} anchor targets')
    avg = targets.avg_factor + FLOAT32_EPS
    bce = F.binary_cross_entropy_with_logits(logits, targets.labels, reduction='none')
    loss_cls = (bce * targets.label_weights).sum() / avg
    loss_bbox = (smooth_l1(deltas, targets.bbox_targets, 1.0 / 9.0) * targets.bbox_weights).sum() / avg
    return {'loss_rpn_cls': loss_cls, 'loss_rpn_bbox': loss_bbox}


# ----------------------------------------------------------------------------------- R-CNN
@dataclass
class RCNNTargets:
    """Targets of the sampled RoIs of one image (positives first), ``BBoxHead.get_targets``.

    Attributes:
        labels: (n,) int64, class 0..C-1 for positives, C (background) for negatives.
        label_weights: (n,) float32, all 1 (``pos_weight=-1``).
        bbox_targets: (n, 4) deltas / stds (0.2) of positives, 0 for negatives.
        bbox_weights: (n, 4) 1 for positives.
    """
    labels: torch.Tensor
    label_weights: torch.Tensor
    bbox_targets: torch.Tensor
    bbox_weights: torch.Tensor


def rcnn_targets(res: SamplingResult, num_classes: int,
                 stds=(0.2, 0.2, 0.2, 0.2)) -> RCNNTargets:
    """mmdet-2.x ``BBoxHead._get_target_single`` (``reg_decoded_bbox=False``, ``pos_weight=-1``)."""
    p, q = res.pos_bboxes.shape[0], res.neg_bboxes.shape[0]
    device = res.pos_bboxes.device
    labels = torch.full((p + q,), num_classes, dtype=torch.int64, device=device)
    label_weights = torch.ones(p + q, device=device)
    bbox_targets = torch.zeros((p + q, 4), device=device)
    bbox_weights = torch.zeros((p + q, 4), device=device)
    if p:
        labels[:p] = res.pos_gt_labels
        bbox_targets[:p] = encode_boxes(res.pos_bboxes, res.pos_gt_bboxes, stds)
        bbox_weights[:p] = 1.0
    return RCNNTargets(labels, label_weights, bbox_targets, bbox_weights)


def rcnn_loss(cls_score: torch.Tensor, bbox_pred: torch.Tensor, t: RCNNTargets) -> Dict[str, torch.Tensor]:
    """mmdet-2.x ``BBoxHead.loss`` (class-specific regression, background last).

    Args:
        cls_score: (n, C+1) logits. bbox_pred: (n, 4C) deltas. t: targets of the same n RoIs.

    Returns:
        {'loss_cls': sum of softmax CE / max(#RoIs with weight > 0, 1),
         'loss_bbox': sum of SmoothL1(beta=1) of positives' deltas for their gt class / n,
         'acc': top-1 accuracy over the n RoIs in percent (logged, not a loss)}.
    """
    cls_score, bbox_pred = cls_score.float(), bbox_pred.float()
    n = cls_score.shape[0]
    num_classes = cls_score.shape[1] - 1
    avg_factor = max(float((t.label_weights > 0).sum()), 1.0)
    ce = F.cross_entropy(cls_score, t.labels, reduction='none')
    loss_cls = (ce * t.label_weights).sum() / (avg_factor + FLOAT32_EPS)
    pos = (t.labels >= 0) & (t.labels < num_classes)
    if bool(pos.any()):
        pred = bbox_pred.view(n, -1, 4)[pos, t.labels[pos]]
        loss_bbox = (smooth_l1(pred, t.bbox_targets[pos], 1.0) * t.bbox_weights[pos]).sum() \
            / (n + FLOAT32_EPS)
    else:
        loss_bbox = bbox_pred[pos].sum()
    with torch.no_grad():
        acc = (cls_score.argmax(dim=1) == t.labels).float().mean() * 100.0 if n else cls_score.new_zeros(())
    return {'loss_cls': loss_cls, 'loss_bbox': loss_bbox, 'acc': acc}


# ----------------------------------------------------------------------------------- detector-level steps
def rpn_forward_train(detector, x: torch.Tensor, img_shape: Tuple[int, int], gt_bboxes: torch.Tensor,
                      cfg: DetectorTrainConfig, generator: Optional[torch.Generator] = None):
    """RPN losses and training proposals of one image (mmdet ``RPNHead.forward_train``).

    Args:
        detector: a :class:`viddet.models.detector.FasterRCNN`.
        x: (1, 512, h, w) neck features of the key frame (or the method's final features).
        img_shape: (h, w) unpadded resized image size, pixels.
        gt_bboxes: (g, 4) gt boxes, resized-image pixels.

    Returns:
        (losses {'loss_rpn_cls', 'loss_rpn_bbox'}, proposals (k, 5) with k <= rpn_proposal
        max_per_img, detached).
    """
    head = detector.rpn_head
    cls, reg = head(x)
    anchors = head.anchors(tuple(cls.shape[2:]), cls.device)
    targets = rpn_targets(anchors, gt_bboxes, img_shape, cfg, generator)
    losses = rpn_loss(cls, reg, targets)
    proposals = head.proposals_from_outputs(cls, reg, [img_shape], cfg.rpn_proposal())[0]
    return losses, proposals


def sample_rois(proposals: torch.Tensor, gt_bboxes: torch.Tensor, gt_labels: torch.Tensor,
                cfg: DetectorTrainConfig, generator: Optional[torch.Generator] = None) -> SamplingResult:
    """R-CNN assignment (0.5/0.5/0.5) and sampling (256 @ 25 %, gt added) of one image's proposals
    (mmdet ``StandardRoIHead.forward_train``, first half)."""
    assign = max_iou_assign(proposals, gt_bboxes, cfg.rcnn_assigner, gt_labels)
    return random_sample(assign, proposals, gt_bboxes, cfg.rcnn_sampler, gt_labels, generator)


def sum_losses(losses: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Total loss as mmdet ``_parse_losses``: the sum of every entry whose name contains 'loss'."""
    return sum(v for k, v in losses.items() if 'loss' in k)
