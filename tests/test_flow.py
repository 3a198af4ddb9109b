"""FlowNetSimple and flow_warp_feats against hand-computed values and independent implementations."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from viddet.data.transforms import IMG_MEAN_RGB, IMG_STD_RGB
from viddet.models.flownet import FlowNetSimple
from viddet.models.warp import flow_warp_feats


# ----------------------------------------------------------------------------------------------
# flow_warp_feats


def _ramp_feats(h, w):
    """(1, 2, h, w): channel 0 = column index, channel 1 = row index."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing='ij')
    return torch.stack((xs, ys))[None]


def _np_warp(feats, flow_feat):
    """Independent warp: bilinear read at clamp((p + f) * (W-1)/W) (MMTracking's contraction).

    feats: (C, H, W) numpy; flow_feat: (2, H, W) flow already in feature cells.
    """
    c, h, w = feats.shape
    out = np.zeros_like(feats, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            x = min(max((j + flow_feat[0, i, j]) * (w - 1) / w, 0.0), w - 1)
            y = min(max((i + flow_feat[1, i, j]) * (h - 1) / h, 0.0), h - 1)
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
            ax, ay = x - x0, y - y0
            out[:, i, j] = ((1 - ay) * (1 - ax) * feats[:, y0, x0] + (1 - ay) * ax * feats[:, y0, x1]
                            + ay * (1 - ax) * feats[:, y1, x0] + ay * ax * feats[:, y1, x1])
    return out


def test_zero_flow_reproduces_contraction():
    feats = _ramp_feats(3, 4)
    flow = torch.zeros(1, 2, 48, 64)  # full resolution = 16x the feature map
    out = flow_warp_feats(feats, flow)
    # Column w reads x = w * (W-1)/W = w * 3/4, row h reads y = h * 2/3 (not the identity).
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.75, 1.5, 2.25]))
    torch.testing.assert_close(out[0, 1, :, 0], torch.tensor([0.0, 2 / 3, 4 / 3]))


def test_integer_shift_and_border_clamping():
    feats = _ramp_feats(3, 4)
    flow = torch.zeros(3, 2, 48, 64)
    flow[0, 0] = 16.0     # +1 feature cell to the right
    flow[1, 0] = 160.0    # far beyond the right border -> clamped to column W-1
    flow[2, 0] = -160.0   # beyond the left border -> column 0
    flow[2, 1] = 16.0     # and one row down
    out = flow_warp_feats(feats.expand(3, -1, -1, -1), flow)
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([0.75, 1.5, 2.25, 3.0]))
    torch.testing.assert_close(out[1, 0], torch.full((3, 4), 3.0))
    torch.testing.assert_close(out[2, 0], torch.zeros(3, 4))
    # rows read y = (h + 1) * 2/3, clamped to 2
    torch.testing.assert_close(out[2, 1, :, 2], torch.tensor([2 / 3, 4 / 3, 2.0]))


def test_flow_resize_to_feature_size():
    # x-flow equal to the full-res column index: bilinear 1/16 downsampling (align_corners=False)
    # samples column 16*o + 7.5, then x1/16 -> feature flow o + 0.46875.
    feats = _ramp_feats(3, 4)
    flow = torch.zeros(1, 2, 48, 64)
    flow[0, 0] = torch.arange(64, dtype=torch.float32)
    out = flow_warp_feats(feats, flow)
    # read x = (o + o + 0.46875) * 3/4, clamped to 3
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([0.3515625, 1.8515625, 3.0, 3.0]))


def test_warp_matches_independent_bilinear():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 5, 6, generator=g)
    # flow constant over each 16x16 block, so its resized value is exactly that constant
    flow_feat = (torch.rand(2, 2, 5, 6, generator=g) - 0.5) * 6.0
    flow = flow_feat.repeat_interleave(16, dim=2).repeat_interleave(16, dim=3) * 16.0
    out = flow_warp_feats(feats, flow)
    for n in range(2):
        expected = _np_warp(feats[n].double().numpy(), flow_feat[n].double().numpy())
        np.testing.assert_allclose(out[n].numpy(), expected, atol=1e-5)


def test_warp_rejects_bad_shapes():
    with pytest.raises(ValueError):
        flow_warp_feats(torch.zeros(1, 4, 3, 4), torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError):
        flow_warp_feats(torch.zeros(2, 4, 3, 4), torch.zeros(1, 2, 48, 64))


# ----------------------------------------------------------------------------------------------
# FlowNetSimple


@pytest.fixture(scope='module')
def flownet():
    torch.manual_seed(0)
    return FlowNetSimple().eval()


def _normalise(raw_rgb):
    """raw (N, 3, H, W) 0..255 RGB -> detector-normalised tensor."""
    mean = torch.tensor(IMG_MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(IMG_STD_RGB).view(1, 3, 1, 1)
    return (raw_rgb - mean) / std


def test_prepare_inputs_hand_computed(flownet):
    # Target: R=255, G=0, B=51 everywhere -> 1-0.411, 0-0.432, 0.2-0.45 = 0.589, -0.432, -0.25.
    tgt = torch.empty(1, 3, 4, 4)
    tgt[:, 0], tgt[:, 1], tgt[:, 2] = 255.0, 0.0, 51.0
    # Source: R = 0 .. 15 (row-major), G = 102, B = 255.
    src = torch.empty(2, 3, 4, 4)
    src[:, 0] = torch.arange(16, dtype=torch.float32).view(4, 4)
    src[:, 1], src[:, 2] = 102.0, 255.0
    x = flownet.prepare_inputs(_normalise(tgt), _normalise(src), img_shape=(3, 3))
    assert x.shape == (2, 6, 2, 2)
    # half-res pixel (0,0) averages 4 valid pixels; (0,1) has column 3 zeroed (2 of 4 valid);
    # (1,1) has only pixel (2,2) valid.
    exp_t = {0: 0.589, 1: -0.432, 2: -0.25}
    for c, v in exp_t.items():
        torch.testing.assert_close(x[0, c], torch.tensor([[v, v / 2], [v / 2, v / 4]]),
                                   atol=2e-6, rtol=0)
    r = lambda v: v / 255 - 0.411  # noqa: E731
    exp_src_r = torch.tensor([[(r(0) + r(1) + r(4) + r(5)) / 4, (r(2) + r(6)) / 4],
                              [(r(8) + r(9)) / 4, r(10) / 4]])
    torch.testing.assert_close(x[1, 3], exp_src_r, atol=2e-6, rtol=0)
    torch.testing.assert_close(x[1, 4, 0, 0], torch.tensor(0.4 - 0.432), atol=2e-6, rtol=0)
    torch.testing.assert_close(x[1, 5, 1, 1], torch.tensor((1 - 0.45) / 4), atol=2e-6, rtol=0)
    # the single target is paired with both sources
    torch.testing.assert_close(x[0, :3], x[1, :3])


def _constant_flownet(conv2_bias):
    """FlowNet whose raw prediction is (b', -2 b') everywhere, b' = LeakyReLU_0.1(conv2_bias)."""
    net = FlowNetSimple().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.conv1[0].conv.bias.fill_(0.5)
        net.conv2[0].conv.bias[0] = conv2_bias  # conv2 output channel 0 = concat2 channel 0
        net.predict_flow.conv.weight[0, 0, 1, 1] = 1.0
        net.predict_flow.conv.weight[1, 0, 1, 1] = -2.0
    return net


@pytest.mark.parametrize('bias,raw', [(0.3, 0.3), (-0.3, -0.03)])
def test_flownet_output_scale_is_40(bias, raw):
    net = _constant_flownet(bias)
    imgs = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        flow = net(imgs[:1], imgs, img_shape=(60, 90))
    assert flow.shape == (2, 2, 64, 96)
    torch.testing.assert_close(flow[:, 0], torch.full((2, 64, 96), 40 * raw))
    torch.testing.assert_close(flow[:, 1], torch.full((2, 64, 96), -80 * raw))


def _functional_flownet(sd, x):
    """Second implementation of the FlowNetS forward from MMTracking's ``FlowNetSimple`` (its state_dict)."""
    def conv(name, t, stride, act=True):
        w = sd[name + '.conv.weight']
        t = F.conv2d(t, w, sd.get(name + '.conv.bias'), stride=stride, padding=w.shape[-1] // 2)
        return F.leaky_relu(t, 0.1) if act else t

    def deconv(name, t, act):
        t = F.conv_transpose2d(t, sd[name + '.conv.weight'], stride=2, padding=1)
        return F.leaky_relu(t, 0.1) if act else t

    skips = {}
    t = x
    for k, n_convs in ((1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2)):
        t = conv(f'conv{k}.0', t, 2)
        if n_convs == 2:
            t = conv(f'conv{k}.1', t, 1)
        skips[k] = t
    cat = skips[6]
    for k in (5, 4, 3, 2):
        flow = conv(f'predict_flow{k + 1}', cat, 1, act=False)
        h, w = skips[k].shape[-2:]
        up = deconv(f'upsample_flow{k}', flow, act=False)[:, :, :h, :w]
        dec = deconv(f'deconv{k}', cat, act=True)[:, :, :h, :w]
        cat = torch.cat((skips[k], dec, up), dim=1)
    flow = conv('predict_flow', cat, 1, act=False)
    size = (flow.shape[-2] * 8, flow.shape[-1] * 8)
    return F.interpolate(flow, size=size, mode='bilinear', align_corners=False) * 40.0


def test_flownet_matches_functional_reference(flownet):
    g = torch.Generator().manual_seed(1)
    tgt = torch.randn(1, 3, 64, 96, generator=g)
    src = torch.randn(3, 3, 64, 96, generator=g)
    with torch.no_grad():
        flow = flownet(tgt, src, img_shape=(64, 90))
        chunked = flownet(tgt, src, img_shape=(64, 90), chunk_size=2)
        x = flownet.prepare_inputs(tgt, src, (64, 90))
        expected = _functional_flownet(flownet.state_dict(), x)
    assert flow.shape == (3, 2, 64, 96)
    assert flow.abs().max() > 0
    torch.testing.assert_close(flow, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, flow, atol=1e-5, rtol=1e-5)


def test_flownet_state_dict_keys(flownet, shared):
    lines = shared('parity', 'keys', 'fgfa_r50.txt').read_text().splitlines()
    expected = []
    for line in lines:
        name, _, shape = line.partition(' ')
        if name.startswith('motion.'):
            expected.append((name[len('motion.'):],
                             tuple(int(s) for s in shape.split(',') if s)))
    got = [(k, tuple(v.shape)) for k, v in flownet.state_dict().items()]
    assert got == expected
