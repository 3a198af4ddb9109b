"""Winograd F(4x4, 3x3) (:mod:`viddet.speedups.winograd4`) against float64 convolutions, and where
YOLOX's fast convolutions use it."""
import pytest
import torch
import torch.nn.functional as F

from viddet import speedups
from viddet.models.yolox import BaseConv
from viddet.runtime import cpu_kernels
from viddet.speedups import winograd4
from viddet.speedups.winograd4 import Winograd4Conv


def _exact(x, weight, bias, act):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    return F.silu(y) if act == 'swish' else y


def test_transform_matrices_give_the_one_dimensional_convolution_exactly():
    """A^T [(G g) * (B^T d)] = the 4 outputs of a 3-tap correlation of 6 inputs (float64)."""
    g = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64)
    d = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5, 4.0], dtype=torch.float64)
    y = winograd4._AT @ ((winograd4._G @ g) * (winograd4._BT @ d))
    expected = torch.stack([(d[i:i + 3] * g).sum() for i in range(4)])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('n, c, o, h, w, act', [(3, 128, 160, 21, 30, 'swish'), (12, 256, 256, 18, 18, 'none'),
                                                (1, 64, 32, 7, 5, 'swish'), (2, 16, 16, 4, 8, 'none')])
def test_equals_the_float64_convolution(n, c, o, h, w, act):
    """Any map size (tiles cut at the border), batches taken together or not, bias and SiLU: within
    the module docstring's rounding (<= 2e-5 of the output's magnitude here)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(o, c, 3, 3) / (3 * c ** 0.5), torch.randn(o)
    x = torch.randn(n, c, h, w)
    got = Winograd4Conv(weight, bias)(x.contiguous(memory_format=torch.channels_last), act)
    assert got.shape == (n, o, h, w) and got.is_contiguous(memory_format=torch.channels_last)
    exact = _exact(x, weight, bias, act)
    assert float((got.double() - exact).abs().max()) <= 2e-5 * float(exact.abs().max())
    assert not torch.equal(got, Winograd4Conv(weight, -bias)(x, act))


def test_bad_weights_inputs_and_activations_are_refused():
    with pytest.raises(ValueError, match='3x3 weight'):
        Winograd4Conv(torch.zeros(4, 4, 5, 5), None)
    conv = Winograd4Conv(torch.zeros(4, 4, 3, 3), None)
    with pytest.raises(ValueError, match='expects 4 input channels, got 3'):
        conv(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        conv(torch.zeros(1, 4, 8, 8), 'relu')


def test_applies_to_wide_3x3_stride_1_convolutions_only():
    assert winograd4.applies(torch.nn.Conv2d(256, 256, 3, 1, 1))
    assert winograd4.applies(torch.nn.Conv2d(128, 128, 3, 1, 1))
    assert not winograd4.applies(torch.nn.Conv2d(64, 256, 3, 1, 1))                   # too narrow
    assert not winograd4.applies(torch.nn.Conv2d(256, 256, 3, 2, 1))                  # strided
    assert not winograd4.applies(torch.nn.Conv2d(256, 256, 1))
    assert not winograd4.applies(torch.nn.Conv2d(256, 256, 3, 1, 2, dilation=2))


@pytest.mark.parametrize('on', [True, False])
def test_yolox_fast_conv_uses_it_where_the_kernels_say(on):
    torch.manual_seed(0)
    plain = BaseConv(256, 256, 3).eval()
    plain.bn.running_mean.uniform_(-0.1, 0.1)
    plain.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 256, 12, 20)
    with torch.no_grad():
        expected = plain(x)
        fast = speedups.convert(plain, cpu_kernels(winograd=False, winograd4=on))
        got = fast(x)
    assert isinstance(fast.folded(), Winograd4Conv) is on
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
