"""The training losses of YOLOV (Shi et al., AAAI 2023) and YOLOV++ (Shi et al., IJCV 2025), as the
official code computes them in train mode (github.com/YuHengsss/YOLOV: ``yolox/models/yolovp_msa.py``
``YOLOXHead.forward`` / ``get_losses`` for YOLOV, ``yolox/models/v_plus_head.py`` ``YOLOVHead.forward``
/ ``get_fg_idx`` / ``postprocess_widx`` / ``get_losses`` for YOLOV++ with ``ota_mode``,
``use_pre_nms=False``, ``cat_ota_fg=False``, ``reconf``, ``decouple_reg``). Written from those
semantics.

One call sees a batch of B frames (the official ``gframe`` frames of one video) with their ground
truth; the candidates of all frames attend to one another as at test time. Per frame, SimOTA
(:mod:`viddet.models.simota`) assigns foreground anchors; then, with ``num_fg`` = max(1, number of
foreground anchors of the batch):

* still-image YOLOX terms: ``loss_iou`` = 3 · Σ (1 − IoU²) of the foreground anchors' boxes with
  their boxes; ``loss_obj`` = Σ BCE(obj logit, foreground) over all anchors; ``loss_cls`` =
  Σ BCE(class logits, onehot · IoU target) over the foreground anchors; each divided by num_fg (the
  official L1 term is off: its trainer never sets ``use_l1``);
* YOLOV's ``loss_ref`` = 2 · Σ BCE(refined class logits, target) / num_fg over the *positive*
  candidates only: a candidate that is a foreground anchor takes that anchor's class target; one
  whose box has IoU >= 0.6 with the box of some foreground anchor takes onehot(that anchor's class)
  · IoU; the others are not supervised;
* YOLOV++'s ``loss_refined_obj`` = Σ BCE(refined objectness logit, candidate is a foreground anchor)
  / num_fg over every candidate (a value above 15 is scaled down to 15, gradient included, as the
  official code does), and ``loss_refined_cls`` = Σ BCE(refined class logits, the anchor's class
  target) / num_fg over the candidates that are foreground anchors.

Targets carry no gradient (the official code's boxes feed its targets, but its box branch is frozen).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from viddet.models.simota import Assignment, anchor_grid, simota_assign
from viddet.models.yolov_head import YOLOVHead, YOLOVPPHead, corner_rows
from viddet.models.yolox import STRIDES, decode_grid, flat_anchors, letterbox

REG_WEIGHT = 3.0
REF_WEIGHT = 2.0
REF_IOU = 0.6
"""YOLOV: a candidate whose box has this IoU with a foreground anchor's box is a positive."""
REFINED_OBJ_CAP = 15.0
MULTISCALE_RANGE = 5
"""Multi-scale training: sizes within this many multiples of 32 of the input size (``multiscale_range``)."""
MAX_LABELS = 50
"""Ground-truth boxes kept per frame (the official ``TrainTransform(max_labels=50)``)."""
MAX_LABELS_X = 120
"""YOLOV-X's: its official data go through ``MosaicDetection_VID``, whose own
``TrainTransform(max_labels=120)`` makes the targets (built with ``mosaic=False`` and with the
``mosaic_getitem`` switch of its ``__getitem__`` commented out, it never mosaics, warps or mixes)."""
FROZEN = ('backbone.', 'head.stems.', 'head.cls_convs.', 'head.reg_convs.', 'head.reg_preds.')
"""Parameters the official video fine-tune freezes (``requires_grad = False`` in the exp files'
``get_model``): the whole backbone + PAFPN, the head's stems, first class tower, box tower and box
predictions. Trained: ``cls_convs2``, ``cls_preds``, ``obj_preds`` and the video parts. The frozen
BatchNorms still run in train mode (batch statistics, running statistics updated), as officially."""
UNUSED = ('head.agg.linear1_obj.', 'head.agg.linear2_obj.', 'head.agg_iou.linear1.', 'head.agg_iou.linear2.')
"""YOLOV++ parameters no loss reaches (the box branch of ``agg``, the class branch of ``agg_iou``;
officially computed and dropped, so never updated): frozen too, so that DDP sees no unused
parameter."""


@dataclass
class TrainOutputs:
    """What the head computes for a batch of B frames in training (A anchors, K classes, C channels).

    Attributes:
        raw: (B, A, 5 + K) decoded boxes (cx, cy, w, h, input pixels), obj logit, K class logits.
        rows: B (A, 7 + K) candidate rows (:func:`viddet.models.yolov_head.corner_rows` of the
            sigmoid scores): x1, y1, x2, y2, obj, max cls, class, K class scores.
        cls_feat, reg_feat: (B, A, C) features of ``cls_convs2`` and ``reg_convs``.
        grid: (gx, gy, stride), each (A,) (:func:`viddet.models.simota.anchor_grid`).
    """
    raw: torch.Tensor
    rows: List[torch.Tensor]
    cls_feat: torch.Tensor
    reg_feat: torch.Tensor
    grid: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def train_outputs(head, feats: Sequence[torch.Tensor]) -> TrainOutputs:
    """The head's outputs on the PAFPN features of B frames, logits kept (official training branch)."""
    preds, cls2, regs = [], [], []
    for level, x in enumerate(feats):
        x, reg, box = head.box_level(level, x)
        regs.append(reg)
        cls2.append(head.cls_convs2[level](x))
        preds.append(torch.cat([box, head.cls_preds[level](head.cls_convs[level](x))], 1))
    sizes = [tuple(p.shape[-2:]) for p in preds]
    raw = decode_grid(flat_anchors(preds), sizes)
    scored = torch.cat([raw[..., :4], raw[..., 4:].sigmoid()], -1)
    grid = anchor_grid(sizes, STRIDES, raw.dtype, raw.device)
    return TrainOutputs(raw, [corner_rows(s) for s in scored], flat_anchors(cls2), flat_anchors(regs), grid)


def assign_batch(out: TrainOutputs, targets: Sequence[torch.Tensor]) -> List[Assignment]:
    """SimOTA for every frame; ``targets`` are B (G_b, 5) rows (class, cx, cy, w, h) (G_b may be 0)."""
    result = []
    for b, t in enumerate(targets):
        if len(t) == 0:
            a = out.raw.shape[1]
            empty = out.raw.new_zeros(0)
            result.append(Assignment(torch.zeros(a, dtype=torch.bool, device=out.raw.device), empty.long(), empty,
                                     torch.zeros(0, dtype=torch.int32), 0))
            continue
        r = out.raw[b].detach()
        result.append(simota_assign(t[:, 1:5], t[:, 0], r[:, :4], r[:, 4], r[:, 5:], *out.grid))
    return result


def iou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − IoU² of paired (cx, cy, w, h) boxes (n, 4) -> (n,) (official ``IOUloss``, ``loss_type='iou'``)."""
    tl = torch.max(pred[:, :2] - pred[:, 2:] / 2, target[:, :2] - target[:, 2:] / 2)
    br = torch.min(pred[:, :2] + pred[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2)
    overlap = (tl < br).to(tl.dtype).prod(dim=1)
    inter = torch.prod(br - tl, 1) * overlap
    iou = inter / (torch.prod(pred[:, 2:], 1) + torch.prod(target[:, 2:], 1) - inter + 1e-16)
    return 1 - iou ** 2


def class_targets(assignment: Assignment, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(n_fg, K): onehot(class of each foreground anchor's box) · its IoU target."""
    onehot = F.one_hot(labels[assignment.matched_gt].to(torch.int64), num_classes)
    return onehot * assignment.iou_targets[:, None]


def still_losses(out: TrainOutputs, targets: Sequence[torch.Tensor], assignments: Sequence[Assignment],
                 num_fg: float) -> Dict[str, torch.Tensor]:
    """The still-image YOLOX terms (``loss_iou`` already weighted by 3), each divided by ``num_fg``."""
    k = out.raw.shape[-1] - 5
    fg = torch.cat([a.fg_mask for a in assignments])
    box_t = torch.cat([t[a.matched_gt, 1:5] for t, a in zip(targets, assignments)]).to(out.raw.dtype)
    cls_t = torch.cat([class_targets(a, t[:, 0], k) for t, a in zip(targets, assignments)]).to(out.raw.dtype)
    flat = out.raw.reshape(-1, 5 + k)
    bce = F.binary_cross_entropy_with_logits
    return {'loss_iou': REG_WEIGHT * iou_loss(flat[fg, :4], box_t).sum() / num_fg,
            'loss_obj': bce(flat[:, 4:5], fg[:, None].to(flat.dtype), reduction='none').sum() / num_fg,
            'loss_cls': bce(flat[fg, 5:], cls_t, reduction='none').sum() / num_fg}


def box_iou_xyxy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of (x1, y1, x2, y2) boxes, (n, 4) x (m, 4) -> (n, m) (official ``box_iou``)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return inter / (area_a[:, None] + area_b - inter)


@torch.no_grad()
def yolov_candidate_targets(cand_boxes: torch.Tensor, cand_anchors: torch.Tensor, assignment: Assignment,
                            labels: torch.Tensor, gt_boxes: torch.Tensor, num_classes: int):
    """YOLOV's refined-class targets of one frame's n candidates.

    Args:
        cand_boxes: (n, 4) x1, y1, x2, y2; cand_anchors: (n,) their anchor indices.
        assignment: the frame's SimOTA result; labels, gt_boxes: (G,), (G, 4) cx, cy, w, h.

    Returns:
        (targets (n, K), positive (n,) bool): a foreground anchor's class target, or, for a
        candidate with IoU >= 0.6 with the box of some foreground anchor (the first of the largest
        IoU), onehot(that anchor's class) · IoU; others are not positive.
    """
    n = len(cand_anchors)
    targets = cand_boxes.new_zeros((n, num_classes))
    positive = torch.zeros(n, dtype=torch.bool, device=cand_boxes.device)
    if assignment.num_fg == 0 or n == 0:
        return targets, positive
    fg = assignment.fg_anchors
    cls_t = class_targets(assignment, labels, num_classes).to(targets.dtype)
    m = gt_boxes[assignment.matched_gt]
    m_xyxy = torch.stack([m[:, 0] - 0.5 * m[:, 2], m[:, 1] - 0.5 * m[:, 3], m[:, 0] + 0.5 * m[:, 2],
                          m[:, 1] + 0.5 * m[:, 3]], -1)
    best = box_iou_xyxy(cand_boxes, m_xyxy).max(dim=-1)
    onehot = F.one_hot(labels[assignment.matched_gt].to(torch.int64), num_classes).to(targets.dtype)
    for j in range(n):
        loc = torch.where(fg == cand_anchors[j])[0]
        if len(loc):
            targets[j], positive[j] = cls_t[loc[0]], True
        elif best.values[j] >= REF_IOU:
            targets[j], positive[j] = onehot[best.indices[j]] * best.values[j], True
    return targets, positive


def _candidates(head, out: TrainOutputs):
    """Each frame's candidate anchors (the head's selection), their rows and gathered features."""
    idx = [head.select(r.detach()) for r in out.rows]
    cands = [r[i] for r, i in zip(out.rows, idx)]
    f_cls = torch.cat([out.cls_feat[b, i] for b, i in enumerate(idx)])
    f_reg = torch.cat([out.reg_feat[b, i] for b, i in enumerate(idx)])
    return idx, cands, f_cls, f_reg, torch.cat([c[:, 5] for c in cands])


def _num_fg(assignments: Sequence[Assignment]) -> float:
    return max(float(sum(a.num_fg for a in assignments)), 1.0)


def yolov_losses(head, feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """YOLOV's training losses of a batch of frames.

    Args:
        head: a :class:`viddet.models.yolov_head.YOLOVHead` (in train mode).
        feats: the three PAFPN outputs of the B frames.
        targets: B tensors (G_b, 5): class, cx, cy, w, h in input pixels.

    Returns:
        ``loss_iou`` (weighted), ``loss_obj``, ``loss_cls``, ``loss_ref`` (weighted), and
        ``num_fg`` (foreground anchors per box, not a loss).
    """
    out = train_outputs(head, feats)
    assignments = assign_batch(out, targets)
    num_fg = _num_fg(assignments)
    losses = still_losses(out, targets, assignments, num_fg)
    idx, cands, f_cls, f_reg, score = _candidates(head, out)
    logits, _ = head.refine(f_cls, f_reg, score)
    k = logits.shape[1]
    ref_t, ref_m = zip(*[yolov_candidate_targets(c[:, :4].detach(), i, a, t[:, 0], t[:, 1:5], k)
                         for c, i, a, t in zip(cands, idx, assignments, targets)])
    ref_t, ref_m = torch.cat(ref_t), torch.cat(ref_m)
    losses['loss_ref'] = REF_WEIGHT * F.binary_cross_entropy_with_logits(
        logits[ref_m], ref_t[ref_m], reduction='none').sum() / num_fg
    losses['num_fg'] = torch.tensor(num_fg / max(sum(len(t) for t in targets), 1))
    return losses


@torch.no_grad()
def yolovpp_candidate_targets(cand_anchors: torch.Tensor, assignment: Assignment, labels: torch.Tensor,
                              num_classes: int):
    """YOLOV++'s targets of one frame's candidates: (objectness (n,) 1.0 for the candidates that are
    foreground anchors, class targets (p, K) of those p candidates, in candidate order)."""
    fg = assignment.fg_anchors
    hit = (cand_anchors[:, None] == fg[None]) if len(fg) else cand_anchors.new_zeros((len(cand_anchors), 0)).bool()
    positive = hit.any(dim=1)
    cls_t = class_targets(assignment, labels, num_classes)[hit[positive].int().argmax(dim=1)]
    return positive, cls_t


def yolovpp_losses(head, feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """YOLOV++'s training losses of a batch of frames (arguments as :func:`yolov_losses`).

    Returns:
        ``loss_iou`` (weighted), ``loss_obj``, ``loss_cls``, ``loss_refined_cls``,
        ``loss_refined_obj`` and ``num_fg``. A batch without any candidate gets zero refined terms
        and keeps its still-image terms (the official code returns a constant 0 there, on which its
        trainer's backward fails).
    """
    out = train_outputs(head, feats)
    assignments = assign_batch(out, targets)
    num_fg = _num_fg(assignments)
    losses = still_losses(out, targets, assignments, num_fg)
    idx, cands, f_cls, f_reg, score = _candidates(head, out)
    if f_cls.shape[0] == 0:   # every trainable tensor stays in the graph (DDP expects a gradient for each)
        zero = sum((p * 0.0).sum() for p in head.parameters() if p.requires_grad) + out.raw.sum() * 0.0
        losses.update(loss_refined_cls=zero, loss_refined_obj=zero)
    else:
        logits, obj = head.refine(f_cls, f_reg, score)
        k = logits.shape[1]
        pos, cls_t = zip(*[yolovpp_candidate_targets(i, a, t[:, 0], k) for i, a, t in zip(idx, assignments, targets)])
        pos, cls_t = torch.cat(pos), torch.cat(cls_t).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits
        refined_obj = bce(obj[:, None], pos[:, None].to(obj.dtype), reduction='none').sum() / num_fg
        if refined_obj > REFINED_OBJ_CAP:
            refined_obj = refined_obj / float(refined_obj.detach()) * REFINED_OBJ_CAP
        losses['loss_refined_cls'] = bce(logits[pos], cls_t, reduction='none').sum() / num_fg
        losses['loss_refined_obj'] = refined_obj
    losses['num_fg'] = torch.tensor(num_fg / max(sum(len(t) for t in targets), 1))
    return losses


LOSSES = {YOLOVHead: yolov_losses, YOLOVPPHead: yolovpp_losses}
"""The loss function of each video head."""


def init_score_biases(head, prior: float = 0.01) -> None:
    """The official ``initialize_biases(1e-2)``: the biases of ``cls_preds`` and ``obj_preds`` set to
    −log((1 − prior) / prior), so that every score starts near ``prior``."""
    with torch.no_grad():
        for conv in list(head.cls_preds) + list(head.obj_preds):
            conv.bias.fill_(-math.log((1 - prior) / prior))


def freeze_still_parts(model: torch.nn.Module, official: bool = True) -> None:
    """Sets ``requires_grad = False`` on the parameters under :data:`FROZEN` (with ``official``; else
    nothing of them is frozen: training from scratch) and :data:`UNUSED`, True on the others."""
    frozen = (FROZEN if official else ()) + UNUSED
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))


def train_letterbox(image, scale: Sequence[int]):
    """A training frame as the official loader makes it without augmentation: the letterbox of
    :func:`viddet.models.yolox.letterbox` on a square of side ``min(scale)`` pixels (``data.scale``:
    [576, 576] for the official recipe) -> (tensor (3, S, S), ImageMeta)."""
    return letterbox(image, int(min(scale)))


def frame_targets(boxes: torch.Tensor, labels: torch.Tensor, max_labels: int = MAX_LABELS) -> torch.Tensor:
    """(n, 4) x1, y1, x2, y2 input-pixel boxes and (n,) labels -> (g, 5) rows class, cx, cy, w, h
    (float32 of the float64 conversion, as the official ``xyxy2cxcywh`` in numpy), only the boxes
    whose shorter side exceeds 1 pixel, the first ``max_labels`` of them (``TrainTransform``)."""
    b = boxes.detach().double()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    rows = torch.stack([labels.double(), b[:, 0] + w * 0.5, b[:, 1] + h * 0.5, w, h], 1)
    return rows[torch.minimum(w, h) > 1][:max_labels].float().to(boxes.device)


def multiscale(imgs: torch.Tensor, targets: List[torch.Tensor], generator: torch.Generator):
    """YOLOX's multi-scale training: the frames (B, 3, S, S) resized (bilinear) to a side drawn
    uniformly among the multiples of 32 within ``MULTISCALE_RANGE`` x 32 of S (official: 416..736
    for 576), the target boxes scaled with them. Officially the size changes every 10 iterations;
    here every sample draws its own, from its seed (reproducible, resumable)."""
    side = imgs.shape[-1]
    lo, hi = max(1, side // 32 - MULTISCALE_RANGE), side // 32 + MULTISCALE_RANGE
    size = 32 * int(torch.randint(lo, hi + 1, (1,), generator=generator))
    if size == side:
        return imgs, targets
    imgs = F.interpolate(imgs, size=(size, size), mode='bilinear', align_corners=False)
    scale = targets[0].new_tensor([1.0] + [size / side] * 4)
    return imgs, [t * scale for t in targets]


def sample_losses(model, sample) -> Dict[str, torch.Tensor]:
    """The official training losses of one :class:`viddet.structures.TrainSample`: its key frame and
    reference frames (each with its own ground truth) form one batch in which every frame attends to
    all (the official ``gframe`` frames of a video), at a random scale (:func:`multiscale`, with the
    sample's seed; none for a sample without seed); at most :data:`MAX_LABELS` boxes per frame
    (YOLOV-X: :data:`MAX_LABELS_X`).

    Raises:
        ValueError: the sample's reference frames come without their ground truth.
    """
    refs = sample.ref_imgs.shape[0] if sample.ref_imgs.dim() == 4 else 0
    ref_boxes = sample.ref_gt_bboxes or []
    if len(ref_boxes) != refs:
        raise ValueError(f'{model.title} training needs the ground truth of every reference frame: '
                         f'{refs} reference images, {len(ref_boxes)} ground-truth sets')
    imgs = torch.cat([sample.img[None], sample.ref_imgs]) if refs else sample.img[None]
    cap = MAX_LABELS_X if model.variant == 'yolox_x' else MAX_LABELS
    targets = [frame_targets(b, l, cap) for b, l in zip([sample.gt_bboxes] + list(ref_boxes),
                                                         [sample.gt_labels] + list(sample.ref_gt_labels or []))]
    if sample.seed is not None:
        imgs, targets = multiscale(imgs, targets, sample.generator())
    return LOSSES[type(model.head)](model.head, model.backbone(imgs), targets)
