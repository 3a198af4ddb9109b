"""Anchors, the delta box coder, class-aware NMS and test-time preprocessing against hand-computed
values (mmdet ``AnchorGenerator``, ``DeltaXYWHBBoxCoder``, mmcv ``batched_nms``, MMTracking's test
pipeline) and a second implementation (per-class NMS)."""
import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, nms

from viddet.data.transforms import IMG_MEAN_RGB, IMG_STD_RGB, normalize_pad, preprocess, rescale_size
from viddet.models.boxes import (MAX_LOG_RATIO, base_anchors, batched_nms, decode_boxes, encode_boxes,
                                 grid_anchors)
from viddet.models.detector import RPNHead

S2 = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------- anchors
def expected_base_anchors():
    """Written out by hand from mmdet ``AnchorGenerator.gen_single_level_base_anchors``: base size 16,
    centred on (0, 0), no rounding,
    ratio-major (ratio 0.5, 1, 2 outer; scale 4, 8, 16, 32 inner), ratio = h / w."""
    rows = []
    for ratio_w, ratio_h in ((S2, 1 / S2), (1.0, 1.0), (1 / S2, S2)):  # w_ratio, h_ratio per ratio
        for s in (4, 8, 16, 32):
            w, h = 16 * ratio_w * s, 16 * ratio_h * s
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32)


def test_base_anchors_hand_computed():
    a = base_anchors()
    assert a.shape == (12, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a, expected_base_anchors(), rtol=0, atol=1e-4)
    # a few entries spelled out as numbers
    torch.testing.assert_close(a[4], torch.tensor([-32., -32., 32., 32.]))         # ratio 1, scale 4: 64 px
    torch.testing.assert_close(a[7], torch.tensor([-256., -256., 256., 256.]))     # ratio 1, scale 32: 512 px
    torch.testing.assert_close(a[0], torch.tensor([-45.2548, -22.6274, 45.2548, 22.6274]), rtol=0, atol=1e-4)
    torch.testing.assert_close(a[8], torch.tensor([-22.6274, -45.2548, 22.6274, 45.2548]), rtol=0, atol=1e-4)
    torch.testing.assert_close(a[11], torch.tensor([-181.0193, -362.0387, 181.0193, 362.0387]), rtol=0, atol=1e-3)
    # every anchor of the same scale has the same area (16 s)^2, h / w = ratio
    wh = a[:, 2:] - a[:, :2]
    area = (wh[:, 0] * wh[:, 1]).view(3, 4)
    torch.testing.assert_close(area, torch.tensor([[64.**2, 128.**2, 256.**2, 512.**2]] * 3), rtol=1e-5, atol=0)
    ratios = (wh[:, 1] / wh[:, 0]).view(3, 4)
    torch.testing.assert_close(ratios, torch.tensor([[0.5] * 4, [1.0] * 4, [2.0] * 4]), rtol=1e-5, atol=0)


def test_grid_anchors_location_major_with_stride_shifts():
    base = base_anchors()
    h, w = 2, 3
    g = grid_anchors(base, (h, w), 16)
    assert g.shape == (h * w * 12, 4)
    for i in range(h):
        for j in range(w):
            for a in range(12):
                shift = torch.tensor([16. * j, 16. * i, 16. * j, 16. * i])
                torch.testing.assert_close(g[(i * w + j) * 12 + a], base[a] + shift)
    # first cell is centred on (0, 0) (no +7.5 offset), the last on (32, 16)
    centres = (g[:, :2] + g[:, 2:]) / 2
    assert torch.equal(centres[:12], torch.zeros(12, 2))
    assert torch.equal(centres[-12:], torch.tensor([[32., 16.]] * 12))


def test_rpn_head_has_12_anchors_per_cell_matching_its_outputs():
    head = RPNHead(8)
    assert head.num_anchors == 12
    cls, reg = head(torch.zeros(1, 8, 3, 5))
    assert cls.shape == (1, 12, 3, 5) and reg.shape == (1, 48, 3, 5)
    assert head.anchors((3, 5), 'cpu').shape == (3 * 5 * 12, 4)
    assert head.anchors((3, 5), 'cpu') is head.anchors((3, 5), 'cpu')  # cached per size


# ---------------------------------------------------------------------------------------- coder
def test_decode_hand_computed_delta():
    roi = torch.tensor([[10., 20., 50., 100.]])      # centre (30, 60), size 40 x 80
    delta = torch.tensor([[0.5, -0.25, math.log(2.0), 0.0]])
    out = decode_boxes(roi, delta, (1, 1, 1, 1))
    # gx = 30 + 40*0.5 = 50, gy = 60 - 80*0.25 = 40, gw = 80, gh = 80
    torch.testing.assert_close(out, torch.tensor([[10., 0., 90., 80.]]))
    # stds scale the deltas: 0.2 * (2.5, -1.25, 5 log 2, 0) is the same delta
    out = decode_boxes(roi, torch.tensor([[2.5, -1.25, 5 * math.log(2.0), 0.0]]), (0.2, 0.2, 0.2, 0.2))
    torch.testing.assert_close(out, torch.tensor([[10., 0., 90., 80.]]))


def test_decode_clamps_log_ratio_to_4_135_and_clips_to_image():
    assert MAX_LOG_RATIO == pytest.approx(4.135166556742356)
    roi = torch.tensor([[10., 20., 50., 100.]])
    # dw = +10 is clamped to log(1000/16): gw = 40 * 62.5 = 2500; dh = -10 clamped: gh = 80 / 62.5 = 1.28
    out = decode_boxes(roi, torch.tensor([[0., 0., 10., -10.]]), (1, 1, 1, 1))
    torch.testing.assert_close(out, torch.tensor([[30 - 1250., 60 - 0.64, 30 + 1250., 60 + 0.64]]))
    # clipping to [0, W] x [0, H] with max_shape = (H, W) = (100, 200): the bound is W, not W - 1
    out = decode_boxes(roi, torch.tensor([[0., 0., 10., -10.]]), (1, 1, 1, 1), max_shape=(100, 200))
    torch.testing.assert_close(out, torch.tensor([[0., 59.36, 200., 60.64]]))
    out = decode_boxes(roi, torch.tensor([[-3., 3., 0., 0.]]), (1, 1, 1, 1), max_shape=(100, 200))
    # x: centre 30 - 120 = -90 -> [-110, -70] -> clipped [0, 0]; y: 60 + 240 = 300 -> [260, 340] -> [100, 100]
    torch.testing.assert_close(out, torch.tensor([[0., 100., 0., 100.]]))


def test_decode_class_specific_deltas_layout():
    rois = torch.tensor([[0., 0., 10., 10.], [100., 100., 120., 140.]])
    deltas = torch.zeros(2, 3 * 4)
    deltas[0, 4:8] = torch.tensor([0.1, 0., 0., 0.])   # roi 0, box 1 shifted by 0.1 * 10 = 1 px
    deltas[1, 8:12] = torch.tensor([0., 0.5, 0., 0.])  # roi 1, box 2 shifted by 0.5 * 40 = 20 px
    out = decode_boxes(rois, deltas, (1, 1, 1, 1)).view(2, 3, 4)
    torch.testing.assert_close(out[0, 0], rois[0])
    torch.testing.assert_close(out[0, 1], torch.tensor([1., 0., 11., 10.]))
    torch.testing.assert_close(out[1, 0], rois[1])
    torch.testing.assert_close(out[1, 2], torch.tensor([100., 120., 120., 160.]))


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 500
    props = torch.cat([xy, xy + 10 + torch.rand(200, 2, generator=g) * 290], 1)  # w/h ratios < 62.5
    xy = torch.rand(200, 2, generator=g) * 500
    gt = torch.cat([xy, xy + 10 + torch.rand(200, 2, generator=g) * 290], 1)
    for stds in ((1, 1, 1, 1), (0.2, 0.2, 0.2, 0.2)):
        d = encode_boxes(props, gt, stds)
        torch.testing.assert_close(decode_boxes(props, d, stds), gt, rtol=0, atol=1e-3)
    # hand-computed target: (10,20,50,100) -> (10,0,90,80) is (0.5, -0.25, log 2, 0)
    d = encode_boxes(torch.tensor([[10., 20., 50., 100.]]), torch.tensor([[10., 0., 90., 80.]]), (1, 1, 1, 1))
    torch.testing.assert_close(d, torch.tensor([[0.5, -0.25, math.log(2.0), 0.0]]))


def test_decode_no_rois():
    assert decode_boxes(torch.zeros(0, 4), torch.zeros(0, 120), (0.2,) * 4).shape == (0, 120)


# ---------------------------------------------------------------------------------------- NMS
def per_class_nms(boxes, scores, idxs, thr):
    """Second implementation: torchvision nms class by class, merged and sorted by score."""
    keep = []
    for c in torch.unique(idxs):
        m = (idxs == c).nonzero().view(-1)
        keep.append(m[nms(boxes[m], scores[m], thr)])
    keep = torch.cat(keep)
    return keep[scores[keep].argsort(descending=True)]


def test_batched_nms_never_suppresses_across_classes():
    boxes = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.], [0.5, 0., 10., 10.], [0., 0., 10., 10.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.tensor([0, 1, 0, 2])
    # class 0: box 2 (IoU 0.95 with box 0) suppressed; identical boxes of classes 1 and 2 survive
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1, 3]
    assert batched_nms(boxes, scores, torch.zeros(4, dtype=torch.int64), 0.5).tolist() == [0]
    # suppression needs IoU > threshold: IoU(box0, box2) = 0.95
    assert batched_nms(boxes[[0, 2]], scores[[0, 2]], torch.zeros(2, dtype=torch.int64), 0.95).tolist() == [0, 1]


# 10500 boxes takes mmcv's other branch (NMS class by class above 10000 boxes)
@pytest.mark.parametrize('n,num_classes,seed', [(300, 5, 0), (2000, 30, 1), (10500, 3, 2)])
def test_batched_nms_equals_per_class_nms(n, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 60], 1)
    scores = torch.randperm(n, generator=g).float() / n   # distinct scores: the order is unique
    idxs = torch.randint(0, num_classes, (n,), generator=g)
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = per_class_nms(boxes, scores, idxs, 0.5)
    assert keep.tolist() == expected.tolist()
    assert bool((scores[keep][1:] <= scores[keep][:-1]).all())
    # invariant: no two kept boxes of one class overlap by more than the threshold
    for c in range(num_classes):
        k = keep[idxs[keep] == c]
        if len(k) > 1:
            assert float(box_iou(boxes[k], boxes[k]).fill_diagonal_(0).max()) <= 0.5


def greedy_nms(boxes, scores, order, thr):
    """Third implementation: plain-Python greedy NMS visiting the boxes in ``order``."""
    keep = []
    for i in order.tolist():
        if all(float(box_iou(boxes[i:i + 1], boxes[j:j + 1])) <= thr for j in keep):
            keep.append(i)
    return keep


def test_nms_visits_tied_scores_in_mmcv_order():
    """mmcv's nms_cpu visits boxes in ``scores.sort(descending=True)`` order (torch's unstable
    sort), torchvision's nms in a stable order; they differ for tied scores, which decides which of
    two tied overlapping boxes survives and where a box lands in the proposal list."""
    n = 17   # torch's CPU sort only reorders ties from 17 elements on (insertion sort below)
    scores = torch.full((n,), 0.75)
    mmcv_order = scores.sort(descending=True)[1]
    assert mmcv_order[0] != 0, "torch's sort keeps these ties in place now: pick another case"
    idxs = torch.zeros(n, dtype=torch.int64)
    # all boxes overlap (IoU >= 0.86): exactly one survives, the first that mmcv visits
    overlapping = torch.tensor([[0.0, 0.0, 10.0 + 0.1 * i, 10.0] for i in range(n)])
    assert batched_nms(overlapping, scores, idxs, 0.5).tolist() == greedy_nms(overlapping, scores, mmcv_order, 0.5)
    assert batched_nms(overlapping, scores, idxs, 0.5).tolist() == [int(mmcv_order[0])]
    # disjoint boxes: all survive, listed in mmcv's visiting order, not by index
    disjoint = torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(n)])
    assert batched_nms(disjoint, scores, idxs, 0.5).tolist() == mmcv_order.tolist()
    # distinct scores: the plain score order, whatever the index order
    distinct = torch.linspace(0.1, 0.9, n)
    assert batched_nms(disjoint, distinct, idxs, 0.5).tolist() == list(range(n - 1, -1, -1))


def test_batched_nms_empty():
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)


def test_head_nms_methods_keep_the_first_max_keep_and_are_what_the_heads_use():
    """``RPNHead.nms`` / ``RoIHead.nms``: the first ``max_keep`` of ``batched_nms`` (mmdet's
    ``dets[:max_per_img]``), and the proposal / post-processing paths go through them."""
    from viddet.models.detector import BBoxHead, RCNNConfig, RoIHead, RPNConfig
    from viddet.structures import ImageMeta
    boxes = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.], [0.5, 0., 10., 10.], [0., 0., 10., 10.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.tensor([0, 1, 0, 2])
    rpn, roi = RPNHead(channels=4), RoIHead(BBoxHead(in_channels=4, roi_size=1, fc_channels=8, num_classes=3))
    for head in (rpn, roi):
        assert head.nms(boxes, scores, idxs, 0.5, 5).tolist() == [0, 1, 3]
        assert head.nms(boxes, scores, idxs, 0.5, 2).tolist() == [0, 1]
        assert head.nms(boxes, scores, torch.zeros(4, dtype=torch.int64), 0.99, 2).tolist() == [0, 2]
        assert head.nms(boxes[:0], scores[:0], idxs[:0], 0.5, 2).shape == (0,)
    calls = []

    def first_only(boxes, scores, idxs, iou_threshold, max_keep):
        calls.append((boxes.shape[0], iou_threshold, max_keep))
        return torch.tensor([0])
    rpn.nms = roi.nms = first_only
    cls, reg = torch.randn(1, 12, 3, 4), torch.randn(1, 48, 3, 4) * 0.1
    proposals = rpn.proposals_from_outputs(cls, reg, [(48, 64)], RPNConfig(nms_pre=20))
    assert proposals[0].shape == (1, 5) and float(proposals[0][0, 4]) == float(cls.sigmoid().max())
    rois = torch.tensor([[0., 1., 2., 30., 40.], [0., 5., 5., 20., 20.]])
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    meta = ImageMeta((48, 64), (48, 64), (48, 64), np.ones(4, dtype=np.float32))
    dets = roi.postprocess(rois, logits, torch.zeros(2, 12), meta, RCNNConfig(score_thr=0.0))
    # index 0 of the 6 (roi, class) pairs: roi 0, class 0, its undecoded box
    assert dets.labels.tolist() == [0] and dets.boxes.tolist() == [[1., 2., 30., 40.]]
    assert float(dets.scores[0]) == pytest.approx(math.exp(2) / (math.exp(2) + 3))
    assert calls == [(20, 0.7, 300), (6, 0.5, 100)]   # the top nms_pre=20 of 144 anchors


# ---------------------------------------------------------------------------------------- preprocessing
def test_rescale_sizes_hand_computed():
    assert rescale_size(1280, 720) == (1000, 563)   # s = 0.78125, 720 s = 562.5 -> 563
    assert rescale_size(500, 375) == (800, 600)     # s = min(2, 1.6) = 1.6
    assert rescale_size(1920, 1080) == (1000, 563)  # s = 1000/1920, 1080 s = 562.5 -> 563
    assert rescale_size(375, 500) == (600, 800)     # portrait: limits apply to the long/short edge
    assert rescale_size(64, 48, (128, 96)) == (128, 96)


def test_preprocess_1280x720():
    img = np.zeros((720, 1280, 3), np.uint8)
    tensor, meta = preprocess(img)
    assert tensor.shape == (3, 576, 1008) and tensor.dtype == torch.float32
    assert meta.ori_shape == (720, 1280)
    assert meta.img_shape == (563, 1000)
    assert meta.pad_shape == (576, 1008)
    assert meta.scale_factor.dtype == np.float32
    np.testing.assert_array_equal(meta.scale_factor,
                                  np.array([0.78125, 563 / 720, 0.78125, 563 / 720], np.float32))
    assert float(meta.scale_factor[1]) == pytest.approx(0.7819444, abs=1e-7)


def test_preprocess_500x375():
    tensor, meta = preprocess(np.zeros((375, 500, 3), np.uint8))
    assert meta.img_shape == (600, 800) and meta.pad_shape == (608, 800) and tensor.shape == (3, 608, 800)
    np.testing.assert_array_equal(meta.scale_factor, np.float32([1.6, 1.6, 1.6, 1.6]))


def test_normalised_pixel_hand_computed_and_zero_padding():
    img = np.zeros((375, 500, 3), np.uint8)
    img[:] = (10, 20, 30)        # BGR: blue 10, green 20, red 30
    tensor, _ = preprocess(img, scale=(1000, 563))   # 500x375 -> s = min(2, 1.5013) -> 751x563
    assert tensor.shape == (3, 576, 752)
    expected = torch.tensor([(30 - 123.675) / 58.395, (20 - 116.28) / 57.12, (10 - 103.53) / 57.375])
    torch.testing.assert_close(tensor[:, 100, 200], expected, rtol=0, atol=1e-6)  # channels are RGB
    torch.testing.assert_close(tensor[:, 562, 750], expected, rtol=0, atol=1e-6)  # last real pixel
    assert torch.count_nonzero(tensor[:, 563:, :]) == 0     # padding is 0 after normalisation
    assert torch.count_nonzero(tensor[:, :, 751:]) == 0
    assert IMG_MEAN_RGB == (123.675, 116.28, 103.53) and IMG_STD_RGB == (58.395, 57.12, 57.375)


def test_resize_runs_on_uint8():
    """The resize rounds to uint8 (MMTracking's test pipeline): de-normalised values are integers."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    tensor, meta = preprocess(img, scale=(100, 71))
    h, w = meta.img_shape
    rgb = tensor[:, :h, :w] * torch.tensor(IMG_STD_RGB).view(3, 1, 1) + torch.tensor(IMG_MEAN_RGB).view(3, 1, 1)
    assert (rgb - rgb.round()).abs().max() < 1e-3
    assert float(rgb.min()) >= -1e-3 and float(rgb.max()) <= 255 + 1e-3


def test_normalize_pad_shape_and_bad_input():
    assert normalize_pad(np.zeros((17, 33, 3), np.uint8)).shape == (3, 32, 48)
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10), np.uint8))
