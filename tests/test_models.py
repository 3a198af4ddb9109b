"""Model structure: the DC5 ResNet (mmdet ``ResNet`` with dilated layer4), frozen stages and BN eval,
state-dict names and shapes of every method x backbone against MMTracking's key lists
(../shared/parity/keys), checkpoint descriptions, and the detector's proposal / post-processing steps
on hand-made inputs (mmdet ``RPNHead._get_bboxes_single``, ``BBoxHead.get_bboxes``)."""

import numpy as np
import pytest
import torch

from viddet.errors import VidDetError
from torch import nn

from viddet.checkpoints.reading import describe, describe_state_dict
from viddet.methods import build_method
from viddet.models.backbones import ResNetDC5, build_backbone
from viddet.models.detector import RCNNConfig, RoIHead, BBoxHead, RPNConfig, RPNHead
from viddet.structures import ImageMeta
from conftest import read_keys

METHODS = ('dff', 'fgfa', 'selsa', 'troi')
BACKBONES = ('r50', 'r101', 'x101')
NAMES = {'dff': 'DFF', 'fgfa': 'FGFA', 'selsa': 'SELSA', 'troi': 'SELSA + Temporal RoI Align'}
BACKBONE_NAMES = {'r50': 'R-50', 'r101': 'R-101', 'x101': 'X-101'}




pytestmark = pytest.mark.usefixtures('one_thread')


# ------------------------------------------------------------------------------------ backbone
@pytest.fixture(scope='module')
def r50():
    torch.manual_seed(0)
    return ResNetDC5(50).eval()


def test_layer4_is_dilated_in_every_block_with_stride_1(r50):
    for i, block in enumerate(r50.layer4):
        assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2), f'layer4.{i}'
        assert block.conv2.stride == (1, 1)
        assert block.conv1.stride == (1, 1) and block.conv3.stride == (1, 1)
    assert r50.layer4[0].downsample[0].stride == (1, 1)
    # layers 2 and 3 stride 2 on the 3x3 conv (pytorch style), no dilation anywhere else
    for name, stride in (('layer1', 1), ('layer2', 2), ('layer3', 2)):
        layer = getattr(r50, name)
        assert layer[0].conv2.stride == (stride, stride) and layer[0].conv1.stride == (1, 1)
        assert layer[0].downsample[0].stride == (stride, stride)
        assert all(b.conv2.dilation == (1, 1) for b in layer)
    assert [len(getattr(r50, f'layer{i}')) for i in range(1, 5)] == [3, 4, 6, 3]


def test_output_stride_16(r50):
    with torch.no_grad():
        out = r50(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 2048, 4, 6)
    with torch.no_grad():
        out = r50(torch.randn(2, 3, 72, 40))   # not multiples of 16: ceil(H/16) x ceil(W/16)
    assert out.shape == (2, 2048, 5, 3)


def test_dilation_of_layer4_changes_its_receptive_field(r50):
    """Independent check of the dilation: an impulse at one layer4 input cell reaches cells 2 away
    through a block's dilated 3x3 conv (a dilation-1 conv would reach only 1 away)."""
    block = r50.layer4[1]
    conv = block.conv2
    x = torch.zeros(1, conv.in_channels, 9, 9)
    x[0, :, 4, 4] = 1.0
    with torch.no_grad():
        y = conv(x).abs().sum(1)[0]
    nz = (y > 0).nonzero().tolist()
    assert sorted({r for r, _ in nz}) == [2, 4, 6] and sorted({c for _, c in nz}) == [2, 4, 6]


def test_frozen_stem_and_layer1_and_bn_eval_after_train():
    torch.manual_seed(0)
    model = build_method('single', 'r50')
    model.train()
    bb = model.detector.backbone
    frozen = [bb.conv1, bb.bn1, bb.layer1]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert not m.training
    for name in ('layer2', 'layer3', 'layer4'):
        assert all(p.requires_grad for p in getattr(bb, name).parameters())
        assert getattr(bb, name).training
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53 and all(not m.training for m in bns)
    assert model.detector.rpn_head.training and model.detector.roi_head.training
    # behaviour: a training-mode forward leaves every BN's running statistics untouched
    before = {k: v.clone() for k, v in bb.state_dict().items() if 'running' in k or 'num_batches' in k}
    bb(torch.randn(2, 3, 48, 48) * 5 + 3)
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # gradients reach layer2 but not layer1
    out = bb(torch.randn(1, 3, 32, 32)).sum()
    out.backward()
    assert bb.layer2[0].conv1.weight.grad is not None
    assert bb.layer1[0].conv1.weight.grad is None and bb.conv1.weight.grad is None
    # and back to eval: everything in eval mode
    model.eval()
    assert not any(m.training for m in model.modules())


def test_build_backbone_names():
    with torch.device('meta'):
        assert isinstance(build_backbone('x101'), ResNetDC5)
        assert build_backbone('x101').layer1[0].conv2.groups == 64
    with pytest.raises(VidDetError, match="unknown backbone 'r18': choose one of r50, r101, x101, mobilenetv2"):
        build_backbone('r18')
    with pytest.raises(ValueError, match='depth'):
        ResNetDC5(34)


# ------------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize('backbone', BACKBONES)
@pytest.mark.parametrize('method', METHODS)
def test_state_dict_equals_mmtracking_keys(method, backbone, shared):
    expected = read_keys(shared('parity', 'keys', f'{method}_{backbone}.txt'))
    with torch.device('meta'):   # shapes only: no memory for weights
        model = build_method(method, backbone)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    assert not missing and not unexpected, f'missing {missing[:5]}, unexpected {unexpected[:5]}'
    wrong = [(k, got[k], expected[k]) for k in expected if got[k] != expected[k]]
    assert not wrong, wrong[:5]
    # tensor counts of MMTracking's state dicts: the R-50 detector has 334; SELSA adds 2 aggregators of
    # 4 linear layers (8 tensors each); TRoI adds a 3rd fc (2), 3 aggregators (24) and the embed conv (2)
    if backbone == 'r50':
        extra = {'selsa': 16, 'troi': 2 + 24 + 2}.get(method, 0)
        assert sum(k.startswith('detector.') for k in got) == 334 + extra


@pytest.mark.parametrize('backbone', BACKBONES)
@pytest.mark.parametrize('method', METHODS)
def test_describe_state_dict_names_each_key_list(method, backbone, shared):
    keys = read_keys(shared('parity', 'keys', f'{method}_{backbone}.txt'))
    state = {k: torch.empty(s, device='meta') for k, s in keys.items()}
    assert describe_state_dict(state) == (method, backbone)
    assert describe(method, backbone) == f'a {NAMES[method]} {BACKBONE_NAMES[backbone]} checkpoint'
    # the detector alone, with and without the 'detector.' prefix, is a single-frame model
    det = {k: v for k, v in state.items() if k.startswith('detector.') and '.aggregator.' not in k
           and 'bbox_roi_extractor' not in k}
    assert describe_state_dict(det) == ('single', backbone)
    assert describe_state_dict({k[len('detector.'):]: v for k, v in det.items()}) == ('single', backbone)


def test_describe_examples():
    assert describe('selsa', 'r101') == 'a SELSA R-101 checkpoint'
    assert describe('troi', 'x101') == 'a SELSA + Temporal RoI Align X-101 checkpoint'
    assert describe(None, None).startswith('not a checkpoint of a method viddet knows (single, dff, fgfa, selsa, troi')
    assert describe_state_dict({'foo.weight': torch.zeros(1)}) == (None, None)


# ------------------------------------------------------------------------------------ detector steps
def test_rpn_proposals_hand_made_outputs():
    """Hand-made RPN outputs on a 1 x 2 map: scores select, boxes are clipped to the unpadded image,
    zero-size boxes are dropped, NMS at 0.7 removes duplicates and the result is score-sorted."""
    head = RPNHead(8)
    cls = torch.full((1, 12, 1, 2), -10.0)
    reg = torch.zeros((1, 48, 1, 2))
    # anchor 4 (ratio 1, 64 px) of cell x=0 and x=1 (centres 0 and 16): clipped to (0,0,32,32)
    # and (0,0,48,32): IoU 32*32 / 48*32 = 0.667 < 0.7, both kept.
    cls[0, 4, 0, 0], cls[0, 4, 0, 1] = 3.0, 2.0
    # anchor 5 (128 px) of cell 0, clipped to (0,0,64,64) with a big dx pushing it right out of the
    # image: x1 = x2 = 100 after clipping (zero width) -> dropped
    cls[0, 5, 0, 0] = 4.0
    reg[0, 5 * 4, 0, 0] = 5.0
    props = head.proposals_from_outputs(cls, reg, [(80, 100)], RPNConfig(nms_pre=6000, max_per_img=300))[0]
    assert props.shape[1] == 5
    top = props[:2]
    torch.testing.assert_close(top[:, :4], torch.tensor([[0., 0., 32., 32.], [0., 0., 48., 32.]]))
    torch.testing.assert_close(top[:, 4], torch.sigmoid(torch.tensor([3.0, 2.0])))
    assert bool((props[:, 2] > props[:, 0]).all() and (props[:, 3] > props[:, 1]).all())
    assert float(props[:, [0, 2]].max()) <= 100 and float(props[:, [1, 3]].max()) <= 80
    assert bool((props[1:, 4] <= props[:-1, 4]).all())
    # nms_pre keeps only the top-k anchors before NMS; max_per_img caps the output
    props = head.proposals_from_outputs(cls, reg, [(80, 100)], RPNConfig(nms_pre=2, max_per_img=300))[0]
    assert props.shape[0] == 1   # top 2 = anchor 5 (dropped, zero width) and anchor 4 of cell 0
    torch.testing.assert_close(props[0, :4], torch.tensor([0., 0., 32., 32.]))
    props = head.proposals_from_outputs(cls, reg, [(80, 100)], RPNConfig(max_per_img=1))[0]
    assert props.shape[0] == 1


def test_postprocess_hand_computed():
    head = RoIHead(BBoxHead(in_channels=1, roi_size=1, fc_channels=4, num_classes=2))
    rois = torch.tensor([[0, 10., 10., 50., 50.], [0, 12., 12., 52., 52.]])
    # softmax rows (background last): roi 0 -> (0.6, 0.3, 0.1); roi 1 -> (0.1, 0.8, 0.1)
    cls = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]]))
    deltas = torch.zeros(2, 8)
    meta = ImageMeta((50, 50), (100, 100), (112, 112), np.float32([2, 2, 2, 2]))
    d = head.postprocess(rois, cls, deltas, meta, RCNNConfig())
    # class 0: roi 0 (0.6) suppresses roi 1 (0.1, IoU 0.82); class 1: roi 1 (0.8) suppresses roi 0 (0.3)
    torch.testing.assert_close(d.scores, torch.tensor([0.8, 0.6]))
    assert d.labels.tolist() == [1, 0]
    torch.testing.assert_close(d.boxes, torch.tensor([[6., 6., 26., 26.], [5., 5., 25., 25.]]))
    # strict score threshold, and max_per_img
    d = head.postprocess(rois, cls, deltas, meta, RCNNConfig(score_thr=0.6))
    assert d.labels.tolist() == [1]
    d = head.postprocess(rois, cls, deltas, meta, RCNNConfig(max_per_img=1))
    assert len(d) == 1 and d.labels.tolist() == [1]
    # boxes are clipped to img_shape before rescaling, not after: a delta pushing past 100 px
    deltas[0, 0] = 1.0   # dx = 0.2 * 1 * 40 = 8 px to the right: (18, 10, 58, 50)
    meta_small = ImageMeta((25, 25), (50, 55), (64, 64), np.float32([2, 2, 2, 2]))
    d = head.postprocess(rois, cls, deltas, meta_small, RCNNConfig(nms_iou=1.0))
    box = d.boxes[(d.labels == 0) & (d.scores > 0.5)][0]
    torch.testing.assert_close(box, torch.tensor([9., 5., 27.5, 25.]))
    # empty result
    d = head.postprocess(rois, cls, deltas, meta, RCNNConfig(score_thr=0.9))
    assert len(d) == 0 and d.boxes.shape == (0, 4)


def test_single_frame_detector_output_invariants():
    torch.manual_seed(0)
    model = build_method('single', 'r50').eval()
    from viddet.data.transforms import preprocess
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    tensor, meta = preprocess(img, scale=(128, 96))
    with torch.no_grad():
        feats = model.detector.extract_feat(tensor[None])
        assert feats.shape == (1, 512, 6, 8) and float(feats.min()) >= 0   # post-ReLU neck
        dets = model.detector.detect(feats, meta)
    # random classifier weights give near-uniform class scores (~1/31), so the cap of 100 is reached
    assert len(dets) == 100
    assert dets.boxes.shape == (100, 4) and dets.boxes.dtype == torch.float32
    assert bool((dets.scores > 1e-4).all()) and bool((dets.scores[1:] <= dets.scores[:-1]).all())
    assert int(dets.labels.min()) >= 0 and int(dets.labels.max()) < 30
    # boxes were clipped to the resized image (128 x 96), then divided by the scale factor 2
    assert float(dets.boxes.min()) >= 0
    assert float(dets.boxes[:, [0, 2]].max()) <= 64 + 1e-4 and float(dets.boxes[:, [1, 3]].max()) <= 48 + 1e-4


def test_empty_detections():
    from viddet.structures import Detections
    assert len(Detections.empty()) == 0 and Detections.empty().boxes.shape == (0, 4)
