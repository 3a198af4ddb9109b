"""Targets and losses against hand-computed values (mmdet-2.x MaxIoUAssigner / RandomSampler /
AnchorHead.loss / BBoxHead.loss semantics, with MMTracking's faster_rcnn_r50_dc5 train_cfg)."""
import math

import numpy as np
import pytest
import torch

from viddet.models.boxes import encode_boxes
from viddet.models.losses import (DetectorTrainConfig, anchor_inside_flags, rcnn_loss, rcnn_targets, rpn_loss,
                                  rpn_targets, smooth_l1, sum_losses)
from viddet.models.sampling import AssignerConfig, SamplerConfig, max_iou_assign, random_sample

pytestmark = pytest.mark.usefixtures('one_thread')

RPN = AssignerConfig(0.7, 0.3, 0.3)
RCNN = AssignerConfig(0.5, 0.5, 0.5)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_default_configs_match_mmtracking():
    from viddet.methods import DFF, SELSA
    c = SELSA.train_config()
    assert (c.rpn_assigner.pos_iou_thr, c.rpn_assigner.neg_iou_thr, c.rpn_assigner.min_pos_iou) == (0.7, 0.3, 0.3)
    assert (c.rpn_sampler.num, c.rpn_sampler.pos_fraction, c.rpn_sampler.add_gt_as_proposals) == (256, 0.5, False)
    assert (c.rcnn_assigner.pos_iou_thr, c.rcnn_assigner.neg_iou_thr, c.rcnn_assigner.min_pos_iou) == (0.5, 0.5, 0.5)
    assert (c.rcnn_sampler.num, c.rcnn_sampler.pos_fraction, c.rcnn_sampler.add_gt_as_proposals) == (256, 0.25, True)
    assert c.rpn_proposal().max_per_img == 600 and c.rpn_proposal().nms_pre == 6000 and c.allowed_border == 0
    d = DFF.train_config()
    assert d.rpn_proposal().max_per_img == 1000 and d.rcnn_sampler.num == 512


def test_max_iou_assign_hand_made_boxes():
    gt = t([[0, 0, 10, 10], [100, 100, 120, 120]])
    boxes = t([
        [0, 0, 10, 10],      # IoU 1 with gt0             -> positive, gt 1
        [0, 0, 10, 5],       # IoU 0.5                    -> ignored (between 0.3 and 0.7)
        [0, 0, 10, 2],       # IoU 0.2                    -> negative
        [20, 20, 30, 30],    # IoU 0                      -> negative
        [5, 0, 15, 10],      # IoU 1/3                    -> ignored
        [100, 100, 120, 130],  # IoU 400/600 = 0.667 with gt1: < 0.7 but gt1's best -> positive (low quality)
        [0, 0, 10, 3],       # IoU 0.3 exactly            -> ignored (negatives need IoU < 0.3)
    ])
    r = max_iou_assign(boxes, gt, RPN)
    assert r.gt_inds.tolist() == [1, -1, 0, 0, -1, 2, -1]
    assert r.labels is None
    np.testing.assert_allclose(r.max_overlaps.numpy(), [1, 0.5, 0.2, 0, 1 / 3, 2 / 3, 0.3], atol=1e-6)
    # without low-quality matching box 5 is ignored
    r2 = max_iou_assign(boxes, gt, AssignerConfig(0.7, 0.3, 0.3, match_low_quality=False))
    assert r2.gt_inds.tolist() == [1, -1, 0, 0, -1, -1, -1]
    # R-CNN thresholds with labels: IoU >= 0.5 positive, else negative
    r3 = max_iou_assign(boxes, gt, RCNN, torch.tensor([4, 9]))
    assert r3.gt_inds.tolist() == [1, 1, 0, 0, 0, 2, 0]
    assert r3.labels.tolist() == [4, 4, -1, -1, -1, 9, -1]


def test_low_quality_match_ties_and_later_gt_wins():
    # two boxes share gt0's best IoU (both get gt0); box 2 is the best box of both gt1 and gt2 -> gt2
    gt = t([[0, 0, 10, 10], [50, 50, 60, 60], [50, 50, 60, 61]])
    boxes = t([[0, 0, 10, 16], [0, -6, 10, 10], [50, 50, 61, 62], [200, 200, 210, 210]])
    r = max_iou_assign(boxes, gt, RPN)
    # IoU(box0, gt0) = IoU(box1, gt0) = 100/160 = 0.625 < 0.7, >= 0.3 -> both positive for gt 1
    assert r.gt_inds.tolist() == [1, 1, 3, 0]


def test_assign_without_gt_or_boxes():
    r = max_iou_assign(t([[0, 0, 5, 5], [1, 1, 4, 4]]), torch.zeros((0, 4)), RCNN, torch.zeros(0, dtype=torch.long))
    assert r.gt_inds.tolist() == [0, 0] and r.labels.tolist() == [-1, -1]
    r = max_iou_assign(torch.zeros((0, 4)), t([[0, 0, 5, 5]]), RPN)
    assert r.gt_inds.numel() == 0


def _assign(n_pos, n_neg, n_ign=0):
    gt_inds = torch.tensor([1] * n_pos + [0] * n_neg + [-1] * n_ign)
    return type('A', (), {'gt_inds': gt_inds, 'labels': None})(), torch.rand(len(gt_inds), 4) * 10 + t([0, 0, 20, 20])


@pytest.mark.parametrize('n_pos,n_neg,exp_pos,exp_neg', [
    (10, 1000, 10, 246),    # few positives: the rest of the 256 are negatives
    (200, 1000, 128, 128),  # capped at 50 %
    (5, 20, 5, 20),         # fewer than 256 in total: everything
    (0, 300, 0, 256),
])
def test_rpn_sampler_counts(n_pos, n_neg, exp_pos, exp_neg):
    a, boxes = _assign(n_pos, n_neg, n_ign=7)
    g = torch.Generator().manual_seed(0)
    res = random_sample(a, boxes, t([[0, 0, 5, 5]]), SamplerConfig(256, 0.5, False), generator=g)
    assert res.pos_inds.numel() == exp_pos and res.neg_inds.numel() == exp_neg
    assert bool((a.gt_inds[res.pos_inds] > 0).all()) and bool((a.gt_inds[res.neg_inds] == 0).all())
    assert res.pos_inds.unique().numel() == exp_pos and res.neg_inds.unique().numel() == exp_neg
    assert res.pos_inds.tolist() == sorted(res.pos_inds.tolist())  # mmdet applies unique()


def test_rcnn_sampler_adds_gt_and_caps_positives():
    gt = t([[0, 0, 10, 10], [20, 20, 40, 40]])
    labels = torch.tensor([3, 5])
    props = torch.cat([t([[0, 0, 10, 10]]).repeat(100, 1), t([[100, 100, 110, 110]]).repeat(500, 1)])
    a = max_iou_assign(props, gt, RCNN, labels)
    res = random_sample(a, props, gt, SamplerConfig(256, 0.25, True), labels, torch.Generator().manual_seed(1))
    assert res.num_gts == 2
    assert res.pos_inds.numel() == 64 and res.neg_inds.numel() == 192
    assert res.bboxes.shape == (256, 4)
    # few positives: both gts are added as positives of themselves
    props2 = t([[100, 100, 110, 110]]).repeat(300, 1)
    a2 = max_iou_assign(props2, gt, RCNN, labels)
    res2 = random_sample(a2, props2, gt, SamplerConfig(256, 0.25, True), labels, torch.Generator().manual_seed(1))
    assert res2.pos_inds.tolist() == [0, 1] and res2.pos_is_gt.tolist() == [True, True]
    assert res2.pos_gt_labels.tolist() == [3, 5] and torch.equal(res2.pos_bboxes, gt)
    assert res2.neg_inds.numel() == 254


def test_sampler_is_reproducible_with_generator():
    a, boxes = _assign(300, 1000)
    r1 = random_sample(a, boxes, t([[0, 0, 5, 5]]), SamplerConfig(256, 0.5, False), generator=torch.Generator().manual_seed(7))
    r2 = random_sample(a, boxes, t([[0, 0, 5, 5]]), SamplerConfig(256, 0.5, False), generator=torch.Generator().manual_seed(7))
    assert torch.equal(r1.pos_inds, r2.pos_inds) and torch.equal(r1.neg_inds, r2.neg_inds)


def test_smooth_l1_values():
    d = t([0.05, 0.2, -0.2, 2.0])
    np.testing.assert_allclose(smooth_l1(d, torch.zeros(4), 1 / 9).numpy(),
                               [0.5 * 0.05 ** 2 * 9, 0.2 - 0.5 / 9, 0.2 - 0.5 / 9, 2 - 0.5 / 9], rtol=1e-6)
    np.testing.assert_allclose(smooth_l1(d, torch.zeros(4), 1.0).numpy(), [0.00125, 0.02, 0.02, 1.5], rtol=1e-6)


def test_anchor_inside_flags_allowed_border_zero():
    anchors = t([[0, 0, 10, 10], [-1, 0, 10, 10], [0, 0, 96, 10], [0, 0, 95.9, 63.9], [5, 5, 20, 64]])
    assert anchor_inside_flags(anchors, (64, 96), 0).tolist() == [True, False, False, True, False]
    assert anchor_inside_flags(anchors, (64, 96), -1).all()


def test_rpn_targets_and_loss_hand_computed():
    """4 anchors: a positive, a negative, an ignored one, and a would-be negative outside the image."""
    cfg = DetectorTrainConfig()
    anchors = t([[0, 0, 10, 10],      # IoU with gt 81/119 = 0.68 -> gt's best -> positive (low quality)
                 [40, 40, 50, 50],    # IoU 0 -> negative
                 [0, 0, 10, 5],       # IoU 36/109=0.33 -> ignored
                 [90, 0, 100, 10]])   # outside a 96-wide image -> no weight
    gt = t([[1, 1, 11, 11]])
    tg = rpn_targets(anchors, gt, (64, 96), cfg, torch.Generator().manual_seed(0))
    assert tg.labels.tolist() == [1, 0, 0, 0] and tg.label_weights.tolist() == [1, 1, 0, 0]
    assert (tg.num_pos, tg.num_neg, tg.avg_factor) == (1, 1, 2)
    np.testing.assert_allclose(tg.bbox_targets[0].numpy(), [0.1, 0.1, 0, 0], atol=1e-6)
    assert tg.bbox_weights.sum() == 4
    # head outputs: A = 4 anchors at one location (1, 4, 1, 1) and zero deltas
    logits = t([0.0, 2.0, -1.0, 5.0]).view(1, 4, 1, 1)
    deltas = torch.zeros(1, 16, 1, 1)
    loss = rpn_loss(logits, deltas, tg)
    exp_cls = (math.log(2) + math.log(1 + math.exp(2))) / 2
    exp_bbox = 2 * 0.5 * 0.1 ** 2 * 9 / 2   # two 0.1 deltas below beta = 1/9
    assert loss['loss_rpn_cls'].item() == pytest.approx(exp_cls, rel=1e-6)
    assert loss['loss_rpn_bbox'].item() == pytest.approx(exp_bbox, rel=1e-5)


def test_rpn_targets_without_gt_all_negative():
    cfg = DetectorTrainConfig()
    anchors = t([[0, 0, 10, 10], [10, 10, 20, 20]])
    tg = rpn_targets(anchors, torch.zeros((0, 4)), (64, 96), cfg)
    assert tg.num_pos == 0 and tg.num_neg == 2 and tg.avg_factor == 3  # max(0, 1) + 2


def test_rcnn_targets_and_loss_hand_computed():
    gt = t([[10, 10, 30, 50]])
    props = t([[12, 10, 32, 50],    # IoU 36*40... -> positive
               [100, 100, 120, 120]])
    a = max_iou_assign(props, gt, RCNN, torch.tensor([3]))
    res = random_sample(a, props, gt, SamplerConfig(256, 0.25, False), torch.tensor([3]))
    tg = rcnn_targets(res, num_classes=30)
    assert tg.labels.tolist() == [3, 30]   # background is the last class
    assert tg.label_weights.tolist() == [1, 1]
    # (gx - px) / pw / 0.2 = (20 - 22) / 20 / 0.2 = -0.5; widths/heights equal -> 0
    np.testing.assert_allclose(tg.bbox_targets[0].numpy(), [-0.5, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(tg.bbox_targets[0].numpy(),
                               encode_boxes(props[:1], gt, (0.2,) * 4)[0].numpy(), atol=1e-7)
    cls = torch.zeros(2, 31)
    reg = torch.zeros(2, 120)
    reg[0, 12:16] = t([-0.5, 0.0, 0.0, 0.25])   # class 3's deltas: only dh is off by 0.25
    loss = rcnn_loss(cls, reg, tg)
    assert loss['loss_cls'].item() == pytest.approx(math.log(31), rel=1e-6)
    assert loss['loss_bbox'].item() == pytest.approx(0.5 * 0.25 ** 2 / 2, rel=1e-5)  # / number of RoIs (2)
    assert sum_losses(loss).item() == pytest.approx(loss['loss_cls'].item() + loss['loss_bbox'].item())
    # no positives: loss_bbox is a zero that keeps the graph
    tg0 = rcnn_targets(random_sample(max_iou_assign(props[1:], gt, RCNN, torch.tensor([3])), props[1:], gt,
                                     SamplerConfig(256, 0.25, False), torch.tensor([3])), 30)
    reg0 = torch.zeros(1, 120, requires_grad=True)
    l0 = rcnn_loss(torch.zeros(1, 31), reg0, tg0)
    assert l0['loss_bbox'].item() == 0 and l0['loss_bbox'].requires_grad


def _np_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_single_training_step_rpn_loss_matches_independent_computation():
    """One forward_train of the single-frame detector on a 128x192 image: with the RPN sampler large
    enough to keep every anchor, loss_rpn_cls must equal the BCE over exactly the anchors that an
    independent numpy implementation of the assignment rules selects."""
    from viddet.methods import build_method
    from viddet.structures import TrainSample
    from viddet.structures import ImageMeta
    torch.manual_seed(0)
    model = build_method('single', 'mobilenetv2', 30)
    cfg = model.train_config()
    cfg.rpn_sampler = SamplerConfig(10 ** 6, 0.5, False)
    cfg.rpn_proposal_max_per_img, cfg.rcnn_sampler = 50, SamplerConfig(32, 0.25, True)
    model.train_cfg = cfg
    model.train()
    gt = t([[20, 16, 90, 80]])
    meta = ImageMeta((128, 192), (128, 192), (128, 192), np.ones(4, np.float32))
    sample = TrainSample(torch.randn(3, 128, 192), torch.zeros(0, 3, 128, 192), [meta], gt, torch.tensor([6]), seed=5)
    losses = model.forward_train([sample])
    # independent expectation from the same head outputs
    with torch.no_grad():
        x = model.detector.extract_feat(sample.img[None])
        cls, _ = model.detector.rpn_head(x)
        anchors = model.detector.rpn_head.anchors(tuple(cls.shape[2:]), 'cpu').numpy()
    logits = cls.permute(0, 2, 3, 1).reshape(-1).numpy().astype(np.float64)
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < 192) & (anchors[:, 3] < 128)
    iou = _np_iou(anchors, gt.numpy())[:, 0]
    pos = inside & ((iou >= 0.7) | (np.isclose(iou, iou[inside].max()) & (iou >= 0.3)))
    neg = inside & ~pos & (iou < 0.3)
    assert pos.sum() >= 1 and neg.sum() >= 1
    bce = np.log1p(np.exp(-np.abs(logits))) + np.maximum(logits, 0) - logits * pos
    expected = bce[pos | neg].sum() / (pos.sum() + neg.sum())
    assert losses['loss_rpn_cls'].item() == pytest.approx(expected, rel=1e-5)
    assert set(losses) == {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'acc'}
    assert all(torch.isfinite(v) for v in losses.values())
    total = sum_losses(losses)
    total.backward()
    assert model.detector.roi_head.bbox_head.fc_cls.weight.grad.abs().sum() > 0
    assert model.detector.backbone.features[0][0].weight.grad is None   # frozen stem
