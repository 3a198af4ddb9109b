"""The fast CSPDarknet (:class:`viddet.speedups.cspdarknet.FastCSPDarknet`): the letterbox's grey
padding left out of the stem and dark2..dark4, the rest of each map taken from a blank canvas's maps.
Checked against the plain backbone on letterboxed frames of every shape of padding."""
import pytest
import torch

from viddet import speedups
from viddet.models.yolox import PAD_VALUE, CSPDarknet
from viddet.runtime import cpu_kernels
from viddet.speedups.cspdarknet import FastCSPDarknet, frame_extent, stage_reach


def _randomised(depth=0.33, width=0.25, seed=0):
    torch.manual_seed(seed)
    net = CSPDarknet(depth, width).eval()
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def _letterboxed(n, size, rows, cols, seed=0):
    """n frames of random content in the top-left rows x cols of a size x size grey-114 canvas."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, size, size), float(PAD_VALUE))
    x[..., :rows, :cols] = torch.randint(0, 256, (n, 3, rows, cols), generator=g).float()
    return x


def test_frame_extent_is_the_last_row_and_column_with_content():
    x = torch.full((2, 3, 8, 10), float(PAD_VALUE))
    assert frame_extent(x) == (0, 0)
    x[1, 2, 4, 6] = 0.0          # one value of one frame and channel is enough
    x[0, 0, 1, 0] = 113.0
    assert frame_extent(x) == (5, 7)


def test_stage_reach_counts_the_3x3_convolutions():
    """YOLOX-S (depth 0.33: 1, 3, 3 bottlenecks in dark2..dark4) and YOLOX-L (3, 9, 9): one for the
    stride-2 conv, one per bottleneck's 3x3; the stem's one 3x3; dark5's SPP pools 5, 9, 13 add
    2 + 4 + 6."""
    s, large = CSPDarknet(0.33, 0.5), CSPDarknet(1.0, 1.0)
    assert [stage_reach(m) for m in (s.stem, s.dark2, s.dark3, s.dark4, s.dark5)] == [1, 2, 4, 4, 1 + 12 + 1]
    assert [stage_reach(m) for m in (large.dark2, large.dark3, large.dark4)] == [4, 10, 10]


@pytest.mark.parametrize('rows, cols', [(108, 192), (192, 100), (54, 77), (1, 192), (0, 0)],
                         ids=['landscape', 'portrait', 'both', 'one-row', 'all-grey'])
def test_fast_backbone_equals_the_plain_one_on_letterboxed_frames(rows, cols):
    plain = _randomised()
    x = _letterboxed(3, 192, rows, cols)
    with torch.no_grad():
        expected = plain(x)
        fast = speedups.convert(_randomised(), cpu_kernels())
        assert type(fast) is FastCSPDarknet
        got = fast(x)
    assert fast.blank[1], 'the cropped path ran'
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_blank_maps_are_made_once_per_size_and_weights():
    fast = speedups.convert(_randomised(), cpu_kernels())
    with torch.no_grad():
        fast(_letterboxed(2, 128, 72, 128))
        maps = fast.blank[1]
        fast(_letterboxed(1, 128, 40, 128, seed=1))
        assert fast.blank[1] is maps                               # same size and weights: reused
        fast(_letterboxed(1, 160, 90, 160))
        assert fast.blank[1] is not maps and fast.blank[1][0].shape[-1] == 160
        maps = fast.blank[1]
        fast.stem.conv.bn.running_mean.add_(1.0)                   # new weights: made again
        x = _letterboxed(2, 160, 90, 160)
        got = fast(x)
        assert fast.blank[1] is not maps
    plain = speedups.revert(fast)
    with torch.no_grad():
        for a, b in zip(got, plain(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unpadded_frames_and_autograd_take_the_plain_path():
    fast = speedups.convert(_randomised(), cpu_kernels())
    with torch.no_grad():
        fast(torch.rand(1, 3, 128, 128) * 255)
    assert fast.blank[1] == []
    fast(_letterboxed(1, 128, 64, 128))                            # autograd on: the plain forward
    assert fast.blank[1] == []


def test_focus_weight_reads_the_pixel_of_each_phase_by_hand():
    """Tap (ky, kx) of phase (dy, dx) = image pixel (2 ky + dy, 2 kx + dx) of the 6x6 window."""
    from viddet.speedups.cspdarknet import focus_weight
    w = torch.zeros(1, 4, 3, 3)                   # one input channel, phases tl, bl, tr, br
    w[0, 0, 0, 0], w[0, 1, 2, 1], w[0, 2, 1, 2], w[0, 3, 2, 2] = 1, 2, 3, 4
    big = focus_weight(w)
    expected = torch.zeros(1, 1, 6, 6)
    expected[0, 0, 0, 0], expected[0, 0, 5, 2], expected[0, 0, 2, 5], expected[0, 0, 5, 5] = 1, 2, 3, 4
    assert torch.equal(big, expected)


@pytest.mark.parametrize('size', [(64, 96), (30, 2), (2, 2)])
def test_fast_focus_equals_space_to_depth_then_conv(size):
    from viddet.models.yolox import Focus
    from viddet.speedups.cspdarknet import FastFocus
    torch.manual_seed(0)
    plain = _randomised().stem
    x = torch.rand(2, 3, *size) * 255
    with torch.no_grad():
        expected = plain(x)
        fast = speedups.convert(plain, cpu_kernels())
        assert type(fast) is FastFocus and type(plain) is Focus
        got = fast(x)
        assert fast.fused._key is not None, 'the fused path ran'
        with pytest.raises(RuntimeError):                           # odd size: the plain path, which
            fast(torch.rand(1, 3, 7, 8))                            # refuses it
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('sizes', [(5, 9, 13), (3,), (3, 7), (1, 5)])
def test_cascade_pools_equal_max_pools_exactly(sizes):
    from viddet.speedups.cspdarknet import cascade_pools
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 17).contiguous(memory_format=torch.channels_last)
    x[0, 0, 3, 4] = 50.0                             # a peak near the border spreads exactly k // 2
    for got, k in zip(cascade_pools(x, sizes), sizes):
        assert torch.equal(got, torch.nn.functional.max_pool2d(x, k, 1, k // 2))


def test_fast_spp_equals_the_plain_one():
    from viddet.speedups.cspdarknet import FastSPPBottleneck
    plain = _randomised().dark5[1]
    x = torch.randn(2, plain.conv1.conv.in_channels, 9, 7)
    with torch.no_grad():
        expected = plain(x)
        fast = speedups.convert(plain, cpu_kernels())
        assert type(fast) is FastSPPBottleneck
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)


def test_fast_pafpn_runs_a_few_frames_at_a_time_with_the_same_maps(monkeypatch):
    from viddet.models.yolox import PAFPN
    from viddet.speedups import cspdarknet
    monkeypatch.setattr(cspdarknet, 'FRAME_CHUNK', 2)
    torch.manual_seed(0)
    plain = PAFPN(0.33, 0.25).eval()
    x = _letterboxed(5, 128, 72, 128)
    runs = []
    with torch.no_grad():
        expected = plain(x)
        fast = speedups.convert(plain, cpu_kernels())
        assert type(fast) is cspdarknet.FastPAFPN
        fast.backbone.register_forward_hook(lambda m, inp, out: runs.append(len(inp[0])))
        got = fast(x)
    assert runs == [2, 2, 1]
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_stages_run_layer_by_layer_on_the_rows_each_layer_needs():
    """Rows each of dark3's bottlenecks computes, by hand for a 192 x 192 canvas with 108 rows of
    frame: stem 54 + 1 = 55 rows; dark2: stride-2 conv 28 + 1 = 29, its bottleneck 30; dark3:
    stride-2 conv 15 + 1 = 16, then each bottleneck reads its input's rows plus the two blank rows
    its 3x3 conv reaches: 18, 19, 20 (cropping dark3 as a whole: (2 · (15 + 2 · 4)) / 2 = 23 each, of
    its 24)."""
    fast = speedups.convert(_randomised(), cpu_kernels())
    heights = []
    for bottleneck in fast.dark3[1].m:
        bottleneck.register_forward_hook(lambda m, inp, out: heights.append(inp[0].shape[-2]))
    with torch.no_grad():
        fast(_letterboxed(2, 192, 108, 192))                      # the blank canvas's maps: 24 rows
        assert heights == [24, 24, 24, 18, 19, 20]
        heights.clear()
        fast(_letterboxed(1, 192, 108, 192, seed=1))
    assert heights == [18, 19, 20]
