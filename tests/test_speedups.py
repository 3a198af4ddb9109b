"""Every fast module of ``viddet.speedups`` computes what the plain module it stands in for
computes, ``speedups.convert`` / ``revert`` swap between them (types, state dict, outputs), and the
CPU kernel choice is made once, explicitly."""
import copy
import inspect
import types

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from viddet import speedups
from viddet.errors import VidDetError
from viddet.models.aggregators import EmbedAggregator
from viddet.models.temporal_roi_align import TemporalRoIAlign
from viddet.runtime import cpu_kernels
from viddet.speedups import onednn, winograd
from viddet.speedups.roi_align import merge_taps, roi_align_taps
from viddet.speedups.troi import topk_blocked

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(params=['mkl', 'onednn'])
def kernels(request):
    """This CPU's kernels with each GEMM library (whichever it would pick) and Winograd on (also
    where it is off by default: AVX-512)."""
    return cpu_kernels(gemm=request.param, winograd=True)

def _rois(n, width, height, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 1.3, height * 1.3]) - 40
    wh = torch.rand(n, 2, generator=g) * 300 + 0.5
    rois = torch.cat([torch.zeros(n, 1), xy, xy + wh], dim=1)
    rois[0, 3:] = rois[0, 1:3]                            # zero-size box
    rois[1, 1:] = torch.tensor([-200.0, -200.0, -100.0, -100.0])  # entirely outside the image
    rois[2, 1:] = torch.tensor([0.0, 0.0, float(width), float(height)])  # the whole map
    return rois


@pytest.mark.parametrize('size', [(5, 6), (36, 63)])
def test_roi_align_taps_reproduce_roi_align(size):
    h, w = size
    torch.manual_seed(0)
    feats = torch.randn(1, 7, h, w)
    rois = _rois(60, w * 16, h * 16, seed=1)
    expected = roi_align(feats, rois, 7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    pos, wts = roi_align_taps(rois, h, w, 7, 1 / 16, 2)
    assert pos.shape == wts.shape == (60 * 49, 16)
    assert int(pos.min()) >= 0 and int(pos.max()) < h * w
    rows = feats[0].reshape(7, -1).t()
    got = F.embedding_bag(pos, rows, per_sample_weights=wts, mode='sum')
    got = got.view(60, 7, 7, 7).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # a RoI outside the map has all-zero taps; every in-map sample's weights sum to 1 / 4
    assert float(wts.view(60, 49, 16)[1].abs().sum()) == 0.0
    torch.testing.assert_close(wts.view(60, 49, 4, 4)[2].sum(-1), torch.full((49, 4), 0.25))


def test_roi_align_fast_path_equals_torchvision_for_batches_and_layouts(kernels):
    from viddet.models.detector import SingleRoIExtractor
    from viddet.speedups.detector import FastSingleRoIExtractor
    torch.manual_seed(0)
    ext = speedups.convert(SingleRoIExtractor(), kernels)
    assert type(ext) is FastSingleRoIExtractor
    feats = torch.randn(3, 16, 9, 13)
    rois = _rois(40, 13 * 16, 9 * 16, seed=5)
    rois[:, 0] = torch.arange(40) % 3                        # RoIs of all three images
    expected = roi_align(feats, rois, 7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    with torch.no_grad():
        for f in (feats, feats.contiguous(memory_format=torch.channels_last)):
            got = ext(f, rois)
            assert got.shape == (40, 16, 7, 7) and not got.is_contiguous()   # the gathers' layout
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert ext(feats, rois[:0]).shape == (0, 16, 7, 7)
    trained = ext(feats.requires_grad_(), rois)    # training: torchvision's kernel, gradients flow
    assert trained.is_contiguous() and trained.requires_grad
    torch.testing.assert_close(trained.detach(), expected)

def test_merge_taps_by_hand_and_on_real_taps():
    pos = torch.tensor([[3, 1, 3, 0], [2, 2, 2, 2], [5, 4, 4, 5]])
    w = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [0.25, 0.5, -0.5, 0.125]])
    flat_pos, flat_w, offsets = merge_taps(pos, w)
    # row 0: 1 -> 0.2, 3 -> 0.1 + 0.3, 0 dropped (weight 0); row 1: nothing; row 2: 4 cancels out
    assert flat_pos.tolist() == [1, 3, 5] and offsets.tolist() == [0, 2, 2, 3]
    torch.testing.assert_close(flat_w, torch.tensor([0.2, 0.4, 0.375]))
    # RoIAlign's taps on a real-sized map: the same gathers with ~a third of the taps
    rois = _rois(50, 63 * 16, 38 * 16, seed=2)
    pos, w = roi_align_taps(rois, 38, 63, 7, 1 / 16, 2)
    flat_pos, flat_w, offsets = merge_taps(pos, w)
    assert int(offsets[-1]) == flat_pos.numel() < pos.numel()
    row = torch.arange(50 * 49).repeat_interleave(offsets.diff())
    same_row = row[1:] == row[:-1]
    assert bool((flat_pos[1:] > flat_pos[:-1])[same_row].all())     # distinct, increasing per row
    assert bool((flat_w != 0).all())
    rows = torch.randn(38 * 63, 24)
    dense = F.embedding_bag(pos, rows, per_sample_weights=w, mode='sum')
    merged = F.embedding_bag(flat_pos, rows, offsets[:-1], per_sample_weights=flat_w, mode='sum')
    torch.testing.assert_close(merged, dense, atol=1e-6, rtol=1e-5)
    assert int(offsets.view(50 * 49 + 1)[49 * 2] - offsets[49]) == 0   # RoI 1 lies outside the map


@pytest.mark.parametrize('shape', [(37, 1000), (5, 384), (8, 300), (3, 1024)])
@pytest.mark.parametrize('k', [1, 2, 3])
def test_topk_blocked_equals_topk(shape, k):
    g = torch.Generator().manual_seed(shape[1] + k)
    sim = torch.randn(*shape, generator=g)
    sim[0, 5:9] = 9.0          # a tie in the first row: the values still agree, indices point at them
    values, indices = topk_blocked(sim, k)
    ref_v, ref_i = torch.topk(sim, k, dim=1)
    assert torch.equal(values, ref_v)
    assert torch.equal(sim.gather(1, indices), values)
    assert torch.equal(indices[1:], ref_i[1:])
    assert bool((indices.sort(dim=1).values.diff(dim=1) > 0).all())   # k distinct columns per row


@pytest.mark.parametrize('chunk', [None, 1])
@pytest.mark.parametrize('size', [(9, 11), (20, 27)])    # 99 / 540 reference locations: the
def test_factorized_temporal_roi_align_equals_direct(chunk, size, kernels):  # plain / blocked top-k
    from viddet.speedups.troi import FastTemporalRoIAlign
    torch.manual_seed(3)
    troi = TemporalRoIAlign(out_channels=16, num_temporal_attention_blocks=4)
    feats = torch.relu(torch.randn(1, 16, *size))
    ref_feats = torch.relu(torch.randn(4, 16, *size))
    ref_feats[-1] = feats[0]                     # as SELSA: the current frame is the last reference
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(7, 2, generator=g) * torch.tensor([size[1] * 16 - 60.0, size[0] * 16 - 60.0])
    rois = torch.cat([torch.zeros(7, 1), xy, xy + torch.rand(7, 2, generator=g) * 60 + 16], dim=1)
    with torch.no_grad():
        direct = troi(feats, rois, ref_feats, roi_chunk_size=chunk)
        fast = speedups.convert(troi, kernels)
        assert type(fast) is FastTemporalRoIAlign and type(troi) is TemporalRoIAlign
        got = fast(feats, rois, ref_feats, roi_chunk_size=chunk)
        got_cl = fast(feats.contiguous(memory_format=torch.channels_last), rois,
                      ref_feats.contiguous(memory_format=torch.channels_last), roi_chunk_size=chunk)
        # SELSA's call: a list of maps whose last one is the key map itself; each map's
        # key-frame-independent data is prepared once and reused while the map lives
        maps = list(ref_feats[:-1].split(1)) + [feats]
        selsa_style = fast(feats, rois, maps, roi_chunk_size=chunk)
        kept = fast.reference(maps[0])
        again = fast(feats, rois, maps, roi_chunk_size=chunk)
        assert fast.reference(maps[0]) is kept and torch.equal(again, selsa_style)
        assert torch.equal(speedups.revert(fast)(feats, rois, ref_feats, roi_chunk_size=chunk), direct)
        # the GPU's plan (whole RoI chunks, torch.topk), run here on the CPU tensors
        roi_feats = troi.roi_align(feats, rois).float()
        gpu_plan = fast.aligned(feats, rois, roi_feats, list(ref_feats.split(1)), chunk or 7, cache_sized=False)
    assert got.shape == (7, 16, 7, 7)
    for result in (got, gpu_plan, got_cl, selsa_style):
        torch.testing.assert_close(result, direct, atol=1e-5, rtol=1e-5)

def _randomise_bn(module, seed):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


def test_fused_channels_last_backbone_equals_plain_nchw(monkeypatch):
    """extract_feat at inference (NHWC, BN folded, ReLU/add fused, Winograd for the wide 3x3 convs)
    equals the plain NCHW modules (run with autograd on, which keeps every fast path off), and
    follows weight changes."""
    from viddet.models.detector import build_faster_rcnn
    torch.manual_seed(0)
    det = build_faster_rcnn('r50').eval()
    _randomise_bn(det.backbone, 1)
    img = torch.randn(1, 3, 160, 224)
    speedups.convert(det, cpu_kernels(winograd=True))     # also where it is off by default (AVX-512)
    ran = []
    call = winograd.WinogradConv.__call__
    monkeypatch.setattr(winograd.WinogradConv, '__call__',
                        lambda self, x, *a, **k: ran.append((x.shape[1], self.dilation)) or call(self, x, *a, **k))

    def plain():
        with torch.enable_grad():
            return det.neck(det.backbone(img.contiguous())).detach()

    with torch.inference_mode():
        assert onednn.fused_applies(det.backbone, img)
        got = det.extract_feat(img)
    assert got.shape == (1, 512, 10, 14) and got.is_contiguous(memory_format=torch.channels_last)
    # layer2's three stride-1 3x3 convs, layer3's five, layer4's three (dilated), the neck's
    assert ran == [(128, 1)] * 3 + [(256, 1)] * 5 + [(512, 2)] * 3 + [(2048, 1)]
    torch.testing.assert_close(got, plain(), atol=1e-5, rtol=1e-4)
    # the folded weights are rebuilt after an in-place change (e.g. loading a checkpoint)
    with torch.no_grad():
        det.backbone.layer2[0].bn2.running_mean.add_(0.5)
        det.backbone.layer3[1].conv1.weight.mul_(1.5)
    with torch.inference_mode():
        again = det.extract_feat(img)
    assert not torch.allclose(again, got)
    torch.testing.assert_close(again, plain(), atol=1e-5, rtol=1e-4)
    # and after a change of the kernel choice: no Winograd now
    ran.clear()
    speedups.convert(det, cpu_kernels(winograd=False))
    with torch.inference_mode():
        torch.testing.assert_close(det.extract_feat(img), again, atol=1e-5, rtol=1e-4)
    assert ran == []

@pytest.mark.parametrize('n,c,o,h,w,dilation', [
    (1, 8, 5, 7, 9, 1),      # odd sizes: partial tiles cropped
    (1, 16, 16, 8, 8, 1),    # whole tiles: written in place
    (3, 6, 4, 10, 11, 2),    # a batch, dilated (layer4 of DC5): 2x2 phases of tiles
    (2, 5, 7, 5, 3, 3),      # dilation 3, image narrower than a tile block
    (1, 4, 4, 1, 1, 2),      # one pixel: all but the centre tap in the padding
])
@pytest.mark.parametrize('act', ['none', 'relu', 'leaky_relu'])
def test_winograd_conv_equals_the_direct_convolution(n, c, o, h, w, dilation, act):
    """F(2x2, 3x3) against a float64 F.conv2d (same padding = dilation): rounding-level errors."""
    g = torch.Generator().manual_seed(n * 100 + h)
    x, weight, bias = torch.randn(n, c, h, w, generator=g), torch.randn(o, c, 3, 3, generator=g), torch.randn(o, generator=g)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=dilation, dilation=dilation)
    ref = {'none': ref, 'relu': F.relu(ref), 'leaky_relu': F.leaky_relu(ref, 0.1)}[act]
    got = winograd.WinogradConv(weight, bias, dilation, act, [0.1])(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    # a channels-last input, no bias
    nobias = winograd.WinogradConv(weight, None, dilation)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nobias.double(), F.conv2d(x.double(), weight.double(), padding=dilation, dilation=dilation),
                               atol=2e-5, rtol=1e-5)


def test_winograd_in_chunks_of_the_batch_equals_at_once(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(5, 6, 9, 10, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    conv = winograd.WinogradConv(weight, None, 2)
    whole = conv(x)
    monkeypatch.setattr(winograd, '_MAX_TRANSFORM_BYTES', 1)   # one image per chunk
    assert torch.equal(conv(x), whole)
    torch.testing.assert_close(whole, F.conv2d(x, weight, padding=2, dilation=2), atol=2e-5, rtol=1e-5)


def test_winograd_filter_transform_by_hand():
    """G g G^T of a filter of ones: G's row sums r = (1, 3/2, 1/2, 1), so U = r r^T; and the
    centre tap alone: G's middle column c = (0, 1/2, -1/2, 0), U = c c^T."""
    ones = torch.ones(1, 1, 3, 3)
    r = torch.tensor([1.0, 1.5, 0.5, 1.0])
    assert torch.equal(winograd.filter_transform(ones).view(4, 4), torch.outer(r, r))
    centre = torch.zeros(1, 1, 3, 3)
    centre[0, 0, 1, 1] = 1
    c = torch.tensor([0.0, 0.5, -0.5, 0.0])
    assert torch.equal(winograd.filter_transform(centre).view(4, 4), torch.outer(c, c))
    assert winograd.filter_transform(torch.ones(7, 5, 3, 3)).shape == (16, 5, 7)


def test_winograd_applies_to_wide_same_padded_3x3_convs_only():
    conv = torch.nn.Conv2d
    assert winograd.applies(conv(128, 128, 3, padding=1))
    assert winograd.applies(conv(512, 512, 3, padding=2, dilation=2))
    assert winograd.applies(conv(2048, 512, 3, padding=1, bias=False))
    assert not winograd.applies(conv(64, 64, 3, padding=1))                 # narrow
    assert not winograd.applies(conv(256, 64, 3, padding=1))
    assert not winograd.applies(conv(256, 256, 3, stride=2, padding=1))     # strided
    assert not winograd.applies(conv(256, 256, 3, padding=2))               # padding != dilation
    assert not winograd.applies(conv(256, 256, 3, padding=1, groups=2))
    assert not winograd.applies(conv(256, 256, 1))
    assert not winograd.applies(conv(256, 256, 3, padding=1, padding_mode='reflect'))
    assert not winograd.applies(torch.nn.ConvTranspose2d(256, 256, 3, padding=1))
    with pytest.raises(ValueError, match='3x3'):
        winograd.WinogradConv(torch.ones(4, 4, 5, 5), None)

def test_winograd_or_direct_takes_winograd_from_min_tiles():
    calls = []
    wino = winograd.WinogradConv(torch.ones(2, 2, 3, 3), None)
    pick = winograd.OrDirect(wino, lambda x, *a: calls.append('direct') or x)
    assert winograd.MIN_TILES == 32
    assert wino.tiles(torch.zeros(1, 2, 8, 16)) == 32                      # 4 x 8 tiles of 2x2
    assert pick(torch.zeros(1, 2, 8, 16)).shape == (1, 2, 8, 16) and calls == []
    pick(torch.zeros(1, 2, 8, 14))                                          # 4 x 7
    assert calls == ['direct']
    assert wino.tiles(torch.zeros(3, 2, 5, 9)) == 3 * 3 * 5
    assert winograd.WinogradConv(torch.ones(2, 2, 3, 3), None, 2).tiles(torch.zeros(1, 2, 5, 9)) == 2 * 3 * 4


@pytest.mark.parametrize('use_winograd', [True, False])
def test_rpn_head_fast_path_equals_plain(use_winograd):
    from viddet.models.detector import RPNHead
    torch.manual_seed(0)
    head = RPNHead(channels=128).eval()
    fast = speedups.convert(head, cpu_kernels(winograd=use_winograd))
    x = torch.randn(2, 128, 11, 14).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        cls, reg = fast(x)
        ref_cls, ref_reg = head(x)
    assert isinstance(fast.fused._convs['conv'], winograd.OrDirect) is use_winograd
    torch.testing.assert_close(cls, ref_cls, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reg, ref_reg, atol=1e-5, rtol=1e-4)

@pytest.mark.parametrize('size,crop,act', [((5, 8), (10, 16), True), ((4, 7), (7, 13), True),
                                           ((3, 3), (5, 6), False), ((1, 2), (2, 3), False)])
def test_packed_deconv_writes_the_cropped_conv_transpose(size, crop, act):
    """FlowNet's ConvTranspose2d(k4, s2, p1) with a packed weight, written into a channel slice of
    a larger NHWC buffer with the top-left crop, on even and odd sizes; other batch sizes reuse
    or repack the weight."""
    from viddet.models.layers import ConvAct
    from viddet.speedups.flownet import TransposedDeconv
    torch.manual_seed(0)
    m = ConvAct(5, 3, 4, stride=2, padding=1, bias=False, transposed=True,
                act='leaky_relu' if act else None).eval()
    fast = TransposedDeconv(m)
    for n in (2, 1, 2):
        x = torch.randn(n, 5, *size)
        buf = torch.full((n, crop[0], crop[1], 7), 99.0)
        with torch.no_grad():
            expected = m(x)[:, :, :crop[0], :crop[1]]
            fast.into(x.contiguous(memory_format=torch.channels_last), buf[..., 2:5])
        torch.testing.assert_close(buf[..., 2:5].permute(0, 3, 1, 2), expected, atol=1e-5, rtol=1e-5)
        assert bool((buf[..., :2] == 99).all()) and bool((buf[..., 5:] == 99).all())
    assert len(fast.conv._by_shape) == 2


@pytest.mark.parametrize('size', [(1, 1), (5, 8), (4, 7)])
def test_tap_conv_equals_3x3_flow_conv(size):
    from viddet.models.layers import ConvAct
    from viddet.speedups.flownet import TapConv
    torch.manual_seed(1)
    m = ConvAct(6, 2, 3, stride=1, padding=1, bias=False).eval()
    x = torch.randn(3, 6, *size)
    with torch.no_grad():
        got = TapConv(m)(x.contiguous(memory_format=torch.channels_last))
        expected = m(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('padded,img_shape', [((64, 96), (64, 96)), ((64, 96), (57, 83)),
                                              ((100, 140), (89, 130)), ((36, 52), (36, 51))])
def test_fast_flownet_equals_plain(padded, img_shape):
    """FlowNetSimple with its fast module (packed oneDNN weights, tap-sum flow convs, in-place
    concatenations, half-resolution renormalisation) equals the plain module, on odd inner sizes
    and odd image borders; it follows weight changes and survives a deep copy."""
    from viddet.models.flownet import FlowNetSimple
    from viddet.models.warp import resize_flow
    from viddet.speedups.flownet import FastFlowNetSimple
    torch.manual_seed(0)
    net = FlowNetSimple().eval()
    with torch.no_grad():   # larger weights than the default init: flows of a few pixels
        for p in net.parameters():
            p.mul_(2.0)
    tgt = torch.randn(1, 3, *padded)
    src = torch.randn(3, 3, *padded)
    fast = speedups.convert(net, cpu_kernels(winograd=True))
    assert type(fast) is FastFlowNetSimple and type(net) is FlowNetSimple    # sharing the weights
    with torch.inference_mode():
        expected = net(tgt, src, img_shape)
        x = fast.prepare_inputs(tgt, src, img_shape)
        got = fast(tgt, src, img_shape)
        got_chunked = fast(tgt, src, img_shape, chunk_size=2)
        assert fast.plan._key is not None   # the packed layers ran
        feat_size = (expected.shape[-2] // 16, expected.shape[-1] // 16)
        expected_feat = net.feature_flow(tgt, src, img_shape, feat_size)
        got_feat = fast.feature_flow(tgt, src, img_shape, feat_size)
        got_feat_chunked = fast.feature_flow(tgt, src, img_shape, feat_size, chunk_size=2)
        # from images prepared once each (FGFA's window), fast and plain, in chunks of 2 pairs
        plain_halves = [net.prepare_image(i, img_shape) for i in (tgt, *src.split(1))]
        halves = [fast.prepare_image(i, img_shape) for i in (tgt, *src.split(1))]
        from_prepared = fast.feature_flow_prepared(halves[0], halves[1:], feat_size, chunk_size=2)
        plain_from_prepared = net.feature_flow_prepared(plain_halves[0], plain_halves[1:], feat_size)
    # the fast input is channels-last (renormalised at half resolution), the plain one concatenated
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    torch.testing.assert_close(x, net.prepare_inputs(tgt, src, img_shape), atol=1e-6, rtol=1e-6)
    assert got.shape == expected.shape and got.is_contiguous() and expected.abs().max() > 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_chunked, expected, atol=1e-4, rtol=1e-5)
    # the flow on a stride-16 feature grid: from the network's prediction by a 2x2 block mean where
    # the grid is half the prediction's (64 x 96: 8 x 12 -> 4 x 6), else from the upsampled flow
    assert got_feat.shape == (3, 2) + feat_size and expected_feat.abs().max() > 0.1
    torch.testing.assert_close(expected_feat, resize_flow(expected, feat_size))
    torch.testing.assert_close(got_feat, expected_feat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_feat_chunked, expected_feat, atol=1e-5, rtol=1e-5)
    for fast_half, plain_half in zip(halves, plain_halves):
        torch.testing.assert_close(fast_half, plain_half, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(from_prepared, expected_feat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_from_prepared, expected_feat, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='sources of its shape'):
        fast.feature_flow_prepared(halves[0], [halves[1][:, :, :-2]], feat_size)
    with torch.no_grad():
        net.deconv3.conv.weight.mul_(1.5)   # the plain module's weight is the fast one's
    with torch.inference_mode():
        again, plain_again = fast(tgt, src, img_shape), net(tgt, src, img_shape)
    twin = copy.deepcopy(fast)   # the copy builds its own packed weights
    with torch.inference_mode():
        from_twin = twin(tgt, src, img_shape)
    assert twin.plan is not fast.plan and twin.plan._key is not None
    assert not torch.allclose(again, got, atol=1e-3)
    torch.testing.assert_close(again, plain_again, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(from_twin, again, atol=1e-6, rtol=1e-6)

def test_resized_upsampled_flow_is_the_block_mean():
    """The identity behind ``FastFlowNetSimple.forward_features``: FlowNet's x8 bilinear upsampling
    (align_corners=False) followed by flow_warp_feats' x1/16 resize (scale 1/16, likewise) is the
    2x2 block mean of the prediction times 8/16; by hand for one 2 x 2 block, then on random data."""
    from viddet.models.warp import resize_flow
    p = torch.tensor([[[[1.0, 3.0], [5.0, 11.0]]]]).expand(1, 2, 2, 2)
    up = F.interpolate(p, scale_factor=8, mode='bilinear', align_corners=False) * 8
    assert torch.allclose(resize_flow(up, (1, 1)), torch.full((1, 2, 1, 1), (1 + 3 + 5 + 11) / 4 * 8 / 16))
    torch.manual_seed(0)
    p = torch.randn(3, 2, 12, 18) * 4
    up = F.interpolate(p, scale_factor=8, mode='bilinear', align_corners=False) * 8
    torch.testing.assert_close(resize_flow(up, (6, 9)), F.avg_pool2d(p, 2) * 0.5, atol=1e-6, rtol=1e-6)


def test_warp_feats_on_the_feature_grid_equals_flow_warp_feats():
    from viddet.models.warp import flow_warp_feats, resize_flow, warp_feats
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 6, 9)
    flow = torch.randn(2, 2, 96, 144) * 20
    assert torch.equal(warp_feats(feats, resize_flow(flow, (6, 9))), flow_warp_feats(feats, flow))
    with pytest.raises(ValueError, match='on their grid'):
        warp_feats(feats, flow)
    with pytest.raises(ValueError, match='does not match the feature size'):
        resize_flow(flow, (7, 9))


def test_selsa_head_reuses_the_first_fc_exactly():
    from viddet.models.aggregators import SelsaBBoxHead, SelsaRefProjections
    torch.manual_seed(0)
    head = SelsaBBoxHead(num_classes=4, num_attention_blocks=4, fc_channels=32)
    head.shared_fcs[0] = torch.nn.Linear(8 * 3 * 3, 32)   # small RoIs: 8 channels of 3 x 3
    head.eval()
    cur = torch.randn(5, 8, 3, 3)
    refs = torch.randn(7, 8, 3, 3)
    with torch.no_grad():
        ref_kv = head.ref_projections(refs)
        cur_kv, first = head.ref_projections(cur, return_first_fc=True)
        torch.testing.assert_close(first, head.shared_fcs[0](cur.flatten(1)), atol=1e-5, rtol=1e-5)
        kv = [SelsaRefProjections.cat([a, b]) for a, b in zip(ref_kv, cur_kv)]
        plain = head.forward_cached(cur, kv)
        reused = head.forward_cached(cur, kv, first)
        uncached = head(cur, torch.cat([refs, cur]))
    assert torch.equal(plain[0], reused[0]) and torch.equal(plain[1], reused[1])
    torch.testing.assert_close(reused[0], uncached[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('n,m,c,g', [(7, 50, 64, 4), (300, 1200, 1024, 16)])
def test_fused_selsa_attention_equals_the_attention_formula(n, m, c, g, monkeypatch):
    """FastSelsaAggregator: the fused attention gives softmax(q k^T / sqrt(d)) v per head (computed
    here in float64 from the formula of Wu et al. §3.2 / MMTracking SelsaAggregator), as the plain
    bmm path does; under autograd the plain path runs."""
    from viddet.models.aggregators import SelsaAggregator
    torch.manual_seed(0)
    agg = SelsaAggregator(c, g).eval()
    fast = speedups.convert(agg, cpu_kernels())
    fused = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: fused.append(1) or sdpa(*a, **k))
    x, ref = torch.randn(n, c), torch.randn(m, c)
    d = c // g
    with torch.no_grad():
        refs = agg.project_refs(ref)
        q = agg.fc_embed(x).double().view(n, g, d)
        k, v = refs.key.double().view(m, g, d), refs.value.double().view(m, g, d)
        w = torch.softmax(torch.einsum('ngd,mgd->gnm', q, k) / d ** 0.5, dim=2)
        expected = (torch.einsum('gnm,mgd->ngd', w, v).reshape(n, c) @ agg.fc.weight.double().T
                    + agg.fc.bias.double()).float()
        got = fast.forward_projected(x, refs)
        plain = agg.forward_projected(x, refs)
    assert fused == [1]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(plain, expected, atol=2e-5, rtol=1e-4)
    trained = fast.forward_projected(x, refs)   # autograd records here: the plain path
    assert fused == [1] and trained.requires_grad
    torch.testing.assert_close(trained.detach(), expected, atol=2e-5, rtol=1e-4)

def test_flow_warp_taps_reproduce_grid_sample():
    from viddet.models.warp import flow_warp_feats, resize_flow
    from viddet.speedups.fgfa import flow_warp_taps
    torch.manual_seed(0)
    feats = torch.randn(3, 5, 9, 13)
    flow = torch.randn(3, 2, 144, 208) * 30
    flow[0] = 0.0          # zero flow: the parity-trap contraction, not the identity
    flow[1] = 5000.0       # far outside: border clamping
    expected = flow_warp_feats(feats, flow)
    pos, wts = flow_warp_taps(resize_flow(flow, (9, 13)))
    assert pos.shape == wts.shape == (3, 9 * 13, 4)
    got = torch.stack([F.embedding_bag(pos[i], feats[i].reshape(5, -1).t(), per_sample_weights=wts[i],
                                       mode='sum') for i in range(3)])
    torch.testing.assert_close(got.view(3, 9, 13, 5).permute(0, 3, 1, 2), expected, atol=1e-6, rtol=1e-5)
    # border clamping: everything reads the bottom-right pixel
    assert set(pos[1].unique().tolist()) <= {0, 9 * 13 - 1}


def test_embed_aggregator_from_tap_projections_equals_convs(kernels):
    from viddet.models.warp import flow_warp_feats, resize_flow
    from viddet.speedups.fgfa import aggregate_embedded, embed_sampled, flow_warp_taps, supports_taps, tap_projections
    torch.manual_seed(1)
    agg = EmbedAggregator(channels=16).eval()
    feats = torch.relu(torch.randn(4, 16, 9, 13))
    flow = torch.randn(4, 2, 144, 208) * 20
    with torch.no_grad():
        warped = flow_warp_feats(feats, flow)
        x = feats[:1]
        expected = agg(x, torch.cat([warped, x]))
        proj = [tap_projections(agg, f, kernels.gemm) for f in feats.split(1)]
        pos, wts = flow_warp_taps(resize_flow(flow, (9, 13)))
        embeds = [embed_sampled(agg, proj[i], (9, 13), pos[i], wts[i]) for i in range(4)]
        conv = agg.embed_convs[0](warped).permute(0, 2, 3, 1).reshape(4, -1, 16)
        torch.testing.assert_close(torch.stack(embeds), conv, atol=1e-5, rtol=1e-5)
        x_embed = embed_sampled(agg, proj[0], (9, 13))
        got = aggregate_embedded(x_embed, torch.stack(embeds + [x_embed]), torch.cat([warped, x]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert supports_taps(agg) and not supports_taps(EmbedAggregator(channels=4, num_convs=2))


@pytest.mark.parametrize('num_convs', [1, 2])
def test_fast_embed_aggregator_aggregates_the_window_as_the_plain_one(num_convs, kernels):
    """FGFA's window (the current frame unwarped in the centre slot, the edge frames repeated):
    the factorized embedding where it applies (one conv), the plain warping and convolutions where
    it does not (two convs, autograd on); each frame's projections computed once."""
    from viddet.speedups.fgfa import FastEmbedAggregator
    torch.manual_seed(2)
    agg = EmbedAggregator(channels=8, num_convs=num_convs).eval()
    fast = speedups.convert(agg, kernels)
    assert type(fast) is FastEmbedAggregator and fast.embed_convs is agg.embed_convs
    feats = {i: torch.relu(torch.randn(1, 8, 6, 10)) for i in range(4)}
    window, center, t = [0, 0, 1, 2, 3], 2, 1
    sources = [0, 2, 3]
    flows = torch.randn(3, 2, 6, 10) * 2
    with torch.no_grad():
        expected = agg.aggregate_window(t, window, center, feats, sources, flows)
        got = fast.aggregate_window(t, window, center, feats, sources, flows)
        alone = fast.aggregate_window(t, [1], 0, feats, [], None)     # a one-frame window
    assert len(fast.projections) == (4 if num_convs == 1 else 0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, feats[1], atol=1e-6, rtol=1e-6)   # its own weight is 1
    trained = fast.aggregate_window(t, window, center, feats, sources, flows)
    assert trained.requires_grad                                       # the plain path
    torch.testing.assert_close(trained.detach(), expected, atol=1e-5, rtol=1e-5)

def test_matmul_nt_and_conv1x1_rows_equal_the_products(kernels):
    torch.manual_seed(0)
    gemm = kernels.gemm
    x, w, b = torch.randn(37, 70), torch.randn(23, 70), torch.randn(23)
    expected = (x.double() @ w.double().T + b.double()).float()
    with torch.inference_mode():
        torch.testing.assert_close(onednn.matmul_nt(x, w, b, gemm), expected, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(onednn.matmul_nt(x[::2], w, gemm=gemm), (x[::2].double() @ w.double().T).float(),
                                   atol=1e-4, rtol=1e-5)   # a strided x
        feats = torch.randn(1, 70, 5, 6)
        conv = F.conv2d(feats.double(), w.double()[:, :, None, None])[0].permute(1, 2, 0).reshape(30, 23)
        torch.testing.assert_close(onednn.conv1x1_rows(feats, w, gemm), conv.float(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(onednn.conv1x1_rows(feats.contiguous(memory_format=torch.channels_last), w, gemm),
                                   conv.float(), atol=1e-4, rtol=1e-5)
    xg = x.clone().requires_grad_()     # autograd on: torch.mm, gradients flow
    onednn.matmul_nt(xg, w, b, gemm).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(37, 70))

@pytest.mark.parametrize('method', ['dff', 'fgfa', 'troi'])
def test_every_method_detects_the_same_with_and_without_fast_paths(method, kernels):
    """The whole model, plain vs ``speedups.convert`` (all fast modules that fit it, Winograd's
    included on every machine), on a video."""
    from viddet.benchmark import SyntheticVideo
    from viddet.engine.video import run_video
    from viddet.methods import build_method
    torch.manual_seed(0)
    settings = {'fgfa': dict(num_left=2, num_right=2), 'dff': dict(key_frame_interval=3), 'troi': dict(num_refs=3)}
    plain = build_method(method, 'r50', **settings[method]).eval()
    fast = build_method(method, 'r50', **settings[method]).eval()
    fast.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for m in (plain, fast):
            m.detector.roi_head.bbox_head.fc_cls.weight.mul_(50)
    assert speedups.convert(fast, kernels) is fast
    assert speedups.is_converted(fast) and not speedups.is_converted(plain)
    assert speedups.kernels_of(fast) == kernels and speedups.kernels_of(plain) is None
    video = SyntheticVideo(96, 64, 6, seed=2)
    runs = [[r.detections for r in run_video(m, video, scale=(96, 64))] for m in (plain, fast)]
    if method == 'fgfa':   # the per-frame tap projections went with the frames
        assert len(fast.aggregator.projections) == 0
    for a, b in zip(*runs):
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)

def test_fused_linear_equals_nn_linear_and_respects_autograd(kernels):
    from viddet.models.detector import BBoxHead, RoIHead
    from viddet.speedups.detector import FastLinear, FastRoIHead
    torch.manual_seed(0)
    head = RoIHead(BBoxHead(in_channels=4, roi_size=2, fc_channels=24, num_classes=3)).eval()
    x = torch.randn(7, 16)
    expected = head.bbox_head.shared_fcs[0](x).detach()
    head = speedups.convert(head, kernels)
    layer = head.bbox_head.shared_fcs[0]
    assert type(head) is FastRoIHead and type(layer) is FastLinear
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert (layer.transposed._key is not None) is (kernels.gemm == 'mkl')   # the MKL path ran
    y = layer(x.requires_grad_())  # autograd on: the plain path, gradients flow
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_linears_and_convs_are_converted_inside_their_containers_only():
    """``FastLinear`` inside the RoI head, ``FastConvAct`` inside the neck: FlowNet's and the
    aggregators' ConvActs stay plain (their own fast modules do not call them)."""
    from viddet.methods import build_method
    from viddet.models.layers import ConvAct
    from viddet.speedups.detector import FastConvAct, FastLinear
    model = speedups.convert(build_method('fgfa', 'r50').eval(), cpu_kernels())
    fast = {name for name, m in model.named_modules() if type(m) in (FastConvAct, FastLinear)}
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert fast == linears | {'detector.neck.convs.0'} and linears
    assert all(name.startswith('detector.roi_head.') for name in linears)
    assert type(model.aggregator.embed_convs[0]) is ConvAct and type(model.motion.conv3[1]) is ConvAct

def _fast_module_types():
    return set(speedups.FAST_MODULES.values()) | {f for t in speedups.FAST_MODULES_INSIDE.values() for f in t.values()}


@pytest.mark.parametrize('method', ['fgfa', 'troi'])    # between them, every fast module
def test_convert_revert_round_trip_keeps_types_state_and_outputs(method):
    from viddet.benchmark import SyntheticVideo
    from viddet.engine.video import run_video
    from viddet.methods import build_method
    from viddet.models.fast import FastModule
    torch.manual_seed(0)
    model = build_method(method, 'r50', **({'num_left': 1, 'num_right': 1} if method == 'fgfa' else {'num_refs': 2}))
    model.eval()
    video = SyntheticVideo(64, 48, 3, seed=1)

    def detections():
        return [r.detections for r in run_video(model, video, scale=(64, 48))]

    plain_types = [(name, type(m)) for name, m in model.named_modules()]
    state = model.state_dict(keep_vars=True)
    before = detections()
    plain_attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    kernels = cpu_kernels()
    assert speedups.convert(model, kernels) is model and speedups.convert(model, kernels) is model   # idempotent
    converted = {type(m) for m in model.modules() if isinstance(m, FastModule)}
    assert converted <= _fast_module_types() and len(converted) == (8 if method == 'fgfa' else 7)
    for m in model.modules():
        if isinstance(m, FastModule):   # a subclass of the plain module it stands in for, sharing its state
            assert isinstance(m, m.plain_class()) and m.kernels is kernels
        for value in vars(m).values():  # no patched methods: every method is the class's
            assert not inspect.ismethod(value) and not isinstance(value, (types.MethodType, types.FunctionType))
    assert [name for name, _ in model.named_modules()] == [name for name, _ in plain_types]
    fast_state = model.state_dict(keep_vars=True)
    assert list(fast_state) == list(state) and all(fast_state[k] is state[k] for k in state)
    twin = copy.deepcopy(model)     # a copy's fast modules are the copy's own
    fast_run = detections()
    assert speedups.revert(model) is model and not speedups.is_converted(model) and speedups.is_converted(twin)
    assert [(name, type(m)) for name, m in model.named_modules()] == plain_types
    assert {name: set(vars(m)) for name, m in model.named_modules()} == plain_attrs   # no cache left behind
    assert all(model.state_dict(keep_vars=True)[k] is state[k] for k in state)
    after = detections()
    for a, b, f in zip(before, after, fast_run):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(f.boxes, a.boxes, rtol=1e-4, atol=1e-3)


def test_a_method_declares_fast_modules_of_its_own():
    """A method's ``fast_modules`` (written against ``viddet.models.fast`` in its own file) are
    swapped in and out with the built-in ones, and a fast module is built from and back to its
    plain module with the protocol of ``viddet.models.fast``."""
    from viddet.methods.base import VIDMethod
    from viddet.models.fast import FastModule

    class Double(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return x * self.scale

    class FastDouble(FastModule, Double):
        fast_attributes = ('calls',)

        def __init__(self, plain, kernels):
            super().__init__(plain, kernels)
            self.calls = 0

        def forward(self, x):
            if torch.is_grad_enabled():
                return super().forward(x)
            self.calls += 1
            return x + x * (self.scale - 1)

    class Toy(VIDMethod):
        name = 'toy'
        fast_modules = {Double: FastDouble}

        def __init__(self):
            super().__init__()
            self.block = Double()
            self.head = torch.nn.Sequential(Double())

    toy = Toy()
    assert FastDouble.plain_class() is Double
    with pytest.raises(TypeError, match='built from a plain Double'):
        FastDouble(toy, cpu_kernels())
    speedups.convert(toy, cpu_kernels())
    assert type(toy.block) is FastDouble and type(toy.head[0]) is FastDouble
    assert toy.block.scale is toy.state_dict(keep_vars=True)['block.scale']
    with torch.no_grad():
        assert float(toy.head[0](toy.block(torch.tensor(3.0)))) == 12.0
    assert toy.block.calls == 1 and float(toy.block(torch.tensor(1.0)).detach()) == 2.0   # autograd: plain
    assert toy.block.calls == 1
    speedups.revert(toy)
    assert type(toy.block) is Double and 'calls' not in vars(toy.block) and 'kernels' not in vars(toy.block)
    assert list(toy.state_dict()) == ['block.scale', 'head.0.scale']


@pytest.mark.parametrize('variable,value,valid', [('VIDDET_WINOGRAD', 'yes', '1 or 0'),
                                                  ('VIDDET_CPU_GEMM', 'blas', 'mkl or onednn'),
                                                  ('VIDDET_WINOGRAD', '2', '1 or 0')])
def test_invalid_kernel_settings_are_refused_clearly(variable, value, valid, monkeypatch):
    from viddet.models.detector import RPNHead
    monkeypatch.setenv(variable, value)
    with pytest.raises(VidDetError) as e:
        speedups.convert(RPNHead(channels=4))
    assert str(e.value).startswith(f"{variable}='{value}' is not valid: use {valid}")
    monkeypatch.setenv(variable, f' {value.upper()} ' if value == 'blas' else value)
    with pytest.raises(VidDetError, match=variable):
        cpu_kernels()

def test_temporal_roi_align_trains_through_the_direct_path():
    """With autograd on (training), TemporalRoIAlign must give gradients to its embedding conv and the
    key features, and equal the inference-mode (factorized) result."""
    torch.manual_seed(0)
    troi = speedups.convert(TemporalRoIAlign(out_channels=16), cpu_kernels())
    feats = torch.randn(1, 16, 6, 8, requires_grad=True)
    refs = torch.randn(3, 16, 6, 8)
    rois = torch.tensor([[0, 8.0, 8.0, 90.0, 70.0], [0, 20.0, 4.0, 60.0, 50.0]])
    out = troi(feats, rois, refs)
    out.square().sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert troi.embed_network.conv.weight.grad.abs().sum() > 0
    maps = list(refs.split(1))
    with torch.no_grad():
        fast = troi(feats, rois, maps)
    assert len(troi.prepared) == 4      # the 3 reference maps and the key map: the fast path ran
    torch.testing.assert_close(fast, out.detach(), rtol=1e-4, atol=1e-5)

def _nms_case(seed, n, num_classes, levels):
    """n boxes in clusters of near-duplicates (so that NMS suppresses), a tenth of zero width, a
    tenth exact copies of other boxes; scores with ``levels`` distinct values (many exact ties;
    0: continuous); class ids < num_classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(1, n // 30), 2, generator=g) * 500
    xy = centres[torch.randint(0, len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 80 + 1], 1)
    boxes[:n // 10, 2] = boxes[:n // 10, 0]
    boxes[n // 10:n // 5] = boxes[torch.randint(0, n, (n // 5 - n // 10,), generator=g)]
    scores = torch.rand(n, generator=g)
    if levels:
        scores = (scores * levels).floor() / levels
    return boxes, scores, torch.randint(0, num_classes, (n,), generator=g)


@pytest.mark.parametrize('n,num_classes,levels,iou', [
    (3000, 1, 5, 0.7), (6000, 1, 0, 0.7), (2000, 30, 3, 0.5), (9000, 30, 50, 0.5), (1500, 4, 2, 0.0),
    (1500, 2, 7, 1.0), (800, 3, 0, 0.3), (17, 1, 1, 0.5), (1, 1, 0, 0.5)])
def test_early_stopping_nms_keeps_what_plain_nms_keeps_first(n, num_classes, levels, iou):
    """Same indices, same order as ``batched_nms(...)[:max_keep]`` for max_keep below, at and above
    the number kept (ties visited in torch's sort order, as the plain path does)."""
    from viddet.models.boxes import batched_nms
    from viddet.speedups.nms import first_kept
    boxes, scores, idxs = _nms_case(n, n, num_classes, levels)
    full = batched_nms(boxes, scores, idxs, iou)
    for max_keep in sorted({1, 7, 100, 300, len(full) // 2 + 1, len(full), len(full) + 3, n}):
        got = first_kept(boxes, scores, idxs, iou, max_keep)
        assert got.dtype == torch.int64 and torch.equal(got, full[:max_keep]), max_keep
    if n > 1 and levels:   # the tie order matters here: a stable order keeps other boxes
        stable = scores.sort(descending=True, stable=True)[1]
        assert not torch.equal(scores.sort(descending=True)[1], stable)


def test_early_stopping_nms_on_many_random_cases():
    from viddet.models.boxes import batched_nms
    from viddet.speedups.nms import first_kept
    g = torch.Generator().manual_seed(0)
    for seed in range(40):
        n = int(torch.randint(1, 2500, (1,), generator=g))
        boxes, scores, idxs = _nms_case(seed, n, int(torch.randint(1, 6, (1,), generator=g)),
                                        int(torch.randint(0, 8, (1,), generator=g)))
        iou = float(torch.rand(1, generator=g))
        max_keep = int(torch.randint(1, 400, (1,), generator=g))
        assert torch.equal(first_kept(boxes, scores, idxs, iou, max_keep),
                           batched_nms(boxes, scores, idxs, iou)[:max_keep]), seed


def test_early_stopping_nms_decides_ious_at_the_threshold_as_torchvision():
    """The C++ kernel compares the float32 IoU as a double with the threshold: a float32 IoU of
    fl(0.1) = 0.10000000149 suppresses at 0.1 and fl(0.3) at 0.3; fl(0.7) = 0.69999998808 does not
    at 0.7, nor 0.5 at 0.5 (exactly 1/10, 3/10, 7/10, 5/10 here: a 10 x 1 box and a w x 1 box in it)."""
    import numpy as np
    from viddet.models.boxes import batched_nms
    from viddet.speedups.nms import first_kept, float32_threshold
    big = [0.0, 0.0, 10.0, 1.0]
    scores, idxs = torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.int64)
    for w, thr, suppressed in [(1, 0.1, True), (3, 0.3, True), (7, 0.7, False), (5, 0.5, False),
                               (1, 0.09, True), (7, 0.69, True), (7, 0.71, False)]:
        boxes = torch.tensor([big, [0.0, 0.0, float(w), 1.0]])
        expected = [0] if suppressed else [0, 1]
        assert batched_nms(boxes, scores, idxs, thr).tolist() == expected, (w, thr)
        assert first_kept(boxes, scores, idxs, thr, 5).tolist() == expected, (w, thr)
    # at threshold 0: a box touching the kept one (no intersection) or off its corner survives
    # (the negative w and h of the corner box must not multiply into an intersection)
    for other in ([10.0, 0.0, 12.0, 1.0], [11.0, 2.0, 12.0, 3.0], [9.0, 0.5, 12.0, 3.0]):
        boxes = torch.tensor([big, other])
        expected = [0] if other[0] < 10 else [0, 1]
        assert batched_nms(boxes, scores, idxs, 0.0).tolist() == expected, other
        assert first_kept(boxes, scores, idxs, 0.0, 5).tolist() == expected, other
    for thr in (0.1, 0.3, 0.5, 0.7, 1 / 3, 0.0, 1.0):
        f = float32_threshold(thr)
        for x in (np.nextafter(f, np.float32(-1)), f, np.nextafter(f, np.float32(2)), np.float32(thr)):
            assert bool(x > f) == (float(x) > thr), (thr, x)


def test_early_stopping_nms_falls_back_where_it_does_not_apply():
    from viddet.speedups.nms import first_kept, head_nms
    boxes, scores, idxs = _nms_case(0, 1200, 3, 0)
    assert first_kept(boxes.double(), scores.double(), idxs, 0.5, 10) is None
    assert first_kept(boxes, scores, idxs, 0.5, 0) is None
    bad = boxes.clone()
    bad[5, 2] = float('inf')
    assert first_kept(bad, scores, idxs, 0.5, 10) is None
    many = _nms_case(1, 10000, 3, 0)   # mmcv's class-by-class branch
    assert first_kept(*many, 0.5, 10) is None
    assert head_nms(boxes, scores, idxs, 0.5, 301) is None    # < 4 boxes per box kept
    assert head_nms(boxes, scores, idxs, 0.5, 300) is not None
    assert first_kept(boxes[:0], scores[:0], idxs[:0], 0.5, 10).shape == (0,)

def test_heads_propose_and_detect_the_same_with_early_stopping_nms(monkeypatch):
    """RPN proposals (6000 of 28800 anchors, many sigmoid scores tied at 1.0) and post-processed
    detections (~9000 (box, class) pairs) with ``speedups.convert`` equal the plain ones exactly."""
    from viddet.models.detector import BBoxHead, RCNNConfig, RoIHead, RPNConfig, RPNHead
    from viddet.speedups import detector as fast_detector
    from viddet.structures import ImageMeta
    import numpy as np
    torch.manual_seed(0)
    rpn, roi = RPNHead(channels=4), RoIHead(BBoxHead(in_channels=4, roi_size=1, fc_channels=8, num_classes=30))
    cls = torch.randn(1, 12, 40, 60) * 4
    cls[0, :, :10] += 20                       # sigmoid(> 17) == 1.0 in float32: ties
    reg = torch.randn(1, 48, 40, 60) * 0.3
    rois = torch.cat([torch.zeros(300, 1), torch.rand(300, 2) * 800, torch.rand(300, 2) * 200 + 820], 1)
    cls_score, bbox_pred = torch.randn(300, 31), torch.randn(300, 120)
    meta = ImageMeta((480, 1000), (600, 1250), (608, 1264), np.full(4, 1.25, dtype=np.float32))
    early = []
    head_nms = fast_detector.head_nms
    monkeypatch.setattr(fast_detector, 'head_nms', lambda *a: early.append(a[4]) or head_nms(*a))
    outs = []
    for heads in ((rpn, roi), (speedups.convert(rpn, cpu_kernels()), speedups.convert(roi, cpu_kernels()))):
        with torch.no_grad():
            props = heads[0].proposals_from_outputs(cls, reg, [(600, 1000)], RPNConfig())[0]
            dets = heads[1].postprocess(rois, cls_score, bbox_pred, meta, RCNNConfig())
        outs.append((props, dets))
    assert early == [300, 100]                 # the fast heads ran the early-stopping NMS
    (p0, d0), (p1, d1) = outs
    assert p0.shape == (300, 5) and len(d0) == 100
    assert int((p0[:, 4] == 1.0).sum()) > 10
    assert torch.equal(p0, p1)
    assert torch.equal(d0.boxes, d1.boxes) and torch.equal(d0.scores, d1.scores) and torch.equal(d0.labels, d1.labels)


# ------------------------------------------------------------------------------------ YOLOX / YOLOV
def test_fast_base_conv_equals_conv_bn_silu_and_follows_weight_changes():
    """``FastBaseConv`` (BN folded, SiLU as oneDNN's swish post-op, channels-last) equals
    ``silu(bn(conv(x)))`` computed by hand, for 1x1 / 3x3 / stride-2 convs, and is rebuilt after
    an in-place weight change; with autograd on the plain module runs."""
    from viddet.models.yolox import BaseConv
    from viddet.speedups.yolox import FastBaseConv
    torch.manual_seed(0)
    x = torch.randn(2, 8, 13, 17) * 50
    for cin, cout, k, s in [(8, 16, 1, 1), (8, 12, 3, 1), (8, 16, 3, 2)]:
        plain = BaseConv(cin, cout, k, s).eval()
        _randomise_bn(plain, k + s)
        fast = speedups.convert(plain, cpu_kernels())
        assert type(fast) is FastBaseConv and type(plain) is BaseConv and fast.conv is plain.conv

        def by_hand():
            bn = plain.bn
            y = F.conv2d(x, plain.conv.weight, None, s, k // 2)
            y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-3)
            return F.silu(y * bn.weight[:, None, None] + bn.bias[:, None, None]).detach()

        with torch.no_grad():
            got = fast(x)
        assert got.shape == (2, cout, -(-13 // s), -(-17 // s)) and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, by_hand(), atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            plain.bn.running_mean.add_(0.3)
            got = fast(x)
        torch.testing.assert_close(got, by_hand(), atol=1e-4, rtol=1e-4)
        assert fast(x).requires_grad                      # autograd: the plain BaseConv.forward


def test_fast_base_conv_by_winograd_one_frame_at_a_time(monkeypatch):
    """With ``kernels.winograd``, a wide 3x3 stride-1 ``BaseConv`` runs by Winograd, frame by
    frame, and equals the fused direct one (and the plain module)."""
    from viddet.models.yolox import BaseConv
    torch.manual_seed(2)
    plain = BaseConv(128, 128, 3).eval()
    _randomise_bn(plain, 4)
    x = torch.randn(3, 128, 14, 12)
    with torch.no_grad():
        expected = plain(x)
    ran = []
    call = winograd.WinogradConv.__call__
    monkeypatch.setattr(winograd.WinogradConv, '__call__', lambda self, x, *a, **k: ran.append(len(x)) or call(self, x, *a, **k))
    fast = speedups.convert(plain, cpu_kernels(winograd=True))
    with torch.no_grad():
        got = fast(x)
    assert ran == [1, 1, 1] and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    speedups.convert(fast, cpu_kernels(winograd=False))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, atol=1e-4, rtol=1e-4)
    assert ran == [1, 1, 1]


@pytest.mark.parametrize('dense_fraction, patch_bytes', [(0.0, 8 << 20), (1.0, 8 << 20), (1.0, 1), (1.0, 3 * 9 * 16 * 4)],
                         ids=['dense', 'sparse', 'sparse-one-location-at-a-time', 'sparse-three-at-a-time'])
def test_tower_at_equals_the_dense_tower_at_the_locations(dense_fraction, patch_bytes, monkeypatch):
    """Two 3x3 conv + BN + SiLU at some locations (borders and corners included, repeated ones,
    two frames) equal the dense tower's output there, whatever the patches' chunk size."""
    from viddet.models.yolox import _tower
    from viddet.speedups import yolox as fast_yolox
    from viddet.speedups.onednn import FusedConv
    monkeypatch.setattr(fast_yolox, 'DENSE_FRACTION', dense_fraction)
    monkeypatch.setattr(fast_yolox, 'PATCH_BYTES', patch_bytes)
    torch.manual_seed(1)
    tower = _tower(16).eval()
    _randomise_bn(tower, 2)
    x = torch.randn(2, 16, 9, 11) * 3
    b = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    y = torch.tensor([0, 8, 4, 0, 8, 3, 3, 5])
    xs = torch.tensor([0, 10, 5, 10, 0, 1, 1, 7])
    with torch.no_grad():
        expected = tower(x)[b, :, y, xs]
        got = fast_yolox.tower_at(x, [FusedConv(m.conv, m.bn) for m in tower], b, y, xs)
        calls = []
        module = speedups.convert(copy.deepcopy(tower), cpu_kernels())   # the tower's own fast modules
        module.register_forward_hook(lambda m, inp, out: calls.append(out.shape))
        by_module = fast_yolox.tower_at(x, [FusedConv(m.conv, m.bn) for m in tower], b, y, xs, dense=module)
    assert got.shape == (8, 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_module, expected, atol=1e-5, rtol=1e-5)
    assert calls == ([(2, 16, 9, 11)] if dense_fraction == 0.0 else [])     # the module runs the dense case only


def _same_detections(a, b):
    """Every row (x1, y1, x2, y2, obj, cls, label) of ``a`` has one of ``b`` with the same label,
    IoU >= 0.999 and the same score within 1e-5 (order may differ between near-equal scores)."""
    from torchvision.ops import box_iou
    assert a.shape == b.shape
    if len(a) == 0:
        return
    iou = box_iou(a[:, :4], b[:, :4])
    close = (a[:, None, 6] == b[None, :, 6]) & (iou >= 0.999) & \
        ((a[:, None, 4] * a[:, None, 5] - b[None, :, 4] * b[None, :, 5]).abs() <= 1e-5)
    assert bool(close.any(1).all())


@pytest.mark.parametrize('method', ['yolov', 'yolovpp'])
def test_fast_yolov_heads_compute_what_the_plain_ones_compute(method):
    """A random YOLOX-S YOLOV / YOLOV++ model on 3 frames: the same still predictions, candidates
    and detections with ``speedups.convert`` (fused convolutions, ``cls_convs2`` at the candidates
    only, YOLOV's class tower at the top-``pre`` anchors by objectness only) as with the plain
    modules; convert / revert keep the state dict's tensors."""
    from viddet.methods import build_method
    from viddet.speedups.yolox import FastBaseConv, FastYOLOVHead, FastYOLOVPPHead
    torch.manual_seed(0)
    model = build_method(method, 'yolox_s').eval()
    _randomise_bn(model, 3)
    # YOLOV++ takes nearly every anchor of these random weights: a smaller input keeps its attention small
    imgs = torch.rand(3, 3, *((160, 192) if method == 'yolov' else (96, 128))) * 255
    if method == 'yolov':
        model.head.pre = 60      # of 630 anchors: the fast head's class tower runs at these only
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        plain = model(imgs)
    speedups.convert(model, cpu_kernels())
    assert type(model.head) is (FastYOLOVHead if method == 'yolov' else FastYOLOVPPHead)
    assert type(model.backbone.backbone.stem.conv) is FastBaseConv and type(model.head.cls_convs2[0][1]) is FastBaseConv
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in state.items())
    with torch.no_grad():
        fast = model(imgs)
    computed = ~fast.decoded.isnan()
    if method == 'yolov':      # boxes and objectness everywhere, class scores at each frame's top 60
        top = plain.decoded[..., 4].topk(60, dim=1).indices
        expected = torch.zeros_like(computed)
        expected[..., :5] = True
        expected[torch.arange(3)[:, None], top, 5:] = True
        assert torch.equal(computed, expected)
    else:
        assert bool(computed.all())
    torch.testing.assert_close(fast.decoded[computed], plain.decoded[computed], atol=1e-3, rtol=1e-4)
    assert [s.tolist() for s in fast.selected] == [s.tolist() for s in plain.selected]
    assert sum(len(s) for s in fast.selected) >= 30 and sum(len(d) for d in plain.detections) >= 30
    for a, b in zip(fast.detections + fast.still, plain.detections + plain.still):
        _same_detections(a, b)
    speedups.revert(model)
    assert not speedups.is_converted(model) and all(model.state_dict(keep_vars=True)[k] is v for k, v in state.items())


@pytest.mark.parametrize('name', ['yolov_s', 'yolovpp_s'])
def test_fast_and_plain_yolov_reproduce_the_official_detections(name, parity_checkpoint):
    """The converted model (what every command runs) and the plain one each reproduce >= 99% of the
    official code's video detections of the 12-frame clip (../shared/parity/yolov, seed 0) by the
    fixtures' rule (IoU >= 0.99, |score difference| <= 1e-3, same class), and one another's."""
    import importlib.util
    import json
    import cv2
    import numpy as np
    from pathlib import Path
    from viddet.checkpoints.loading import load_model
    from viddet.models.yolox import letterbox
    from viddet.speedups.yolox import FastYOLOVHead, FastYOLOVPPHead
    parity = Path(__file__).resolve().parents[2] / 'shared' / 'parity' / 'yolov'
    clip = parity.parent / 'clips' / 'vid7010_first12'
    if not (parity / 'oracle' / 'compare.py').exists() or not clip.exists():
        pytest.skip(f'{parity} or {clip} is absent: this test needs the shared parity fixtures')
    spec = importlib.util.spec_from_file_location('yolov_compare', parity / 'oracle' / 'compare.py')
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    ref = json.loads((parity / f'ref_{name}_vid7010_first12_seed0.json').read_text())
    expected = [(np.array([d['bbox'] for d in f['detections']], dtype=np.float64).reshape(-1, 4),
                 np.array([d['score'] for d in f['detections']]), np.array([d['label'] for d in f['detections']]))
                for f in ref['frames']]
    imgs = torch.stack([letterbox(cv2.imread(str(clip / f['file_name'])))[0] for f in ref['frames']])
    ratio = np.float32(ref['frames'][0]['ratio'])
    model = load_model(str(parity_checkpoint(f'{name}.txt', 0, parity))).model
    assert type(model.head) in (FastYOLOVHead, FastYOLOVPPHead)     # converted by default

    def detections():
        with torch.no_grad():
            rows = model(imgs).detections
        return [((r[:, :4] / ratio).double().numpy(), (r[:, 4] * r[:, 5]).double().numpy(), r[:, 6].long().numpy())
                for r in rows]

    fast = detections()
    plain = detections() if speedups.revert(model) is model else None
    for got in (fast, plain):
        matched, total, _ = compare.match(expected, got)
        assert total >= 1000 and matched >= 0.99 * total, f'{name}: {matched}/{total}'
    matched, total, _ = compare.match(plain, fast)
    assert matched >= 0.99 * total
