"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3): 16 multiplications per 2x2 output
tile and input channel where a direct convolution needs 36 (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016, section 4).

For an output tile Y (2x2) of one output channel, an input tile d (4x4) of each input channel and
the 3x3 filter g of that channel pair::

    Y = A^T [ sum over channels of (G g G^T) * (B^T d B) ] A        (* elementwise, 4x4)

so the convolution becomes 16 independent matrix products, one per position of the 4x4 transform
grid, (tiles x in_channels) @ (in_channels x out_channels), plus cheap linear input / output
transforms (additions only) and a filter transform done once per weight version. The products do
2.25x fewer floating point operations than the direct convolution. oneDNN's CPU convolutions use
Winograd only on AVX-512 machines (and only for some shapes); on AVX2 CPUs the direct convolution
runs at the machine's GEMM rate, so this is 1.5-1.9x faster there for the detectors' wide 3x3
convolutions (the ChannelMapper neck 2048 -> 512, layer4's dilated 512 -> 512, the RPN conv, layer3;
``benchmarks/RESULTS.md``). With narrow convolutions (< 128 channels, at large feature maps) the
transforms' memory traffic outweighs the saving, and those keep oneDNN's direct kernel
(:func:`applies`).

Dilation: with dilation D an output tile covers rows ``{a + D m}`` (a < D, m < 2) of a 2D-row
block, and reads input rows ``a + D k`` (k < 4): the tiles of all D x D phases are one strided view
of the zero-padded input, so dilated convolutions (layer4 of the DC5 backbone) run the same way.

Where: on CPUs without AVX-512, where it was measured (``CpuKernels.winograd``, decided by
:func:`viddet.runtime.cpu_kernels`; ``VIDDET_WINOGRAD=1`` or ``0`` overrides). With AVX-512,
oneDNN's direct kernels run twice as fast, and on AMD CPUs PyTorch's batched GEMM (MKL) does not use
AVX-512 at all, so the trade is different and has not been measured there.

Values: the transforms are exact in binary arithmetic (coefficients 0, +-1, +-1/2), so the result
differs from the direct convolution only by float rounding, of the same size (measured max
absolute error against a float64 convolution: 2e-6 here, 1e-5 for oneDNN's direct kernel, on
outputs of magnitude ~7; ``tests/test_speedups.py`` bounds it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ['WinogradConv', 'OrDirect', 'applies', 'filter_transform', 'MIN_CHANNELS', 'MIN_TILES']

MIN_CHANNELS = 128
"""Narrowest convolution (in and out channels) :func:`applies` takes: at 128 channels (layer2 at
1000x600) Winograd is 1.1-1.2x faster than oneDNN's direct kernel on AVX2, at 64 (layer1) 0.6x."""

MIN_TILES = 32
"""Fewest 2x2 output tiles (over the batch) :class:`OrDirect` runs by Winograd: below, the filter
transform's 16/9 larger weight outweighs the saving (FlowNet's 1024-channel conv6.1 at 5x8, one
pair: 0.9x; 40 tiles of 512 channels: 1.4x)."""

_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]],
                  dtype=torch.float64)
_MAX_TRANSFORM_BYTES = 256 << 20   # the batch is processed in chunks whose input transform fits


def applies(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution this module computes and speeds up: ``nn.Conv2d``, 3x3,
    stride 1, 'same' zero padding (padding == dilation, any dilation), no groups, at least
    :data:`MIN_CHANNELS` input and output channels. (Whether Winograd runs at all is the kernel
    choice's ``winograd``.)"""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == conv.dilation and conv.dilation[0] == conv.dilation[1]
            and conv.groups == 1 and conv.padding_mode == 'zeros'
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)


def filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """``G g G^T`` of every 3x3 filter: weight (O, C, 3, 3) -> (16, C, O) float32, position
    ``4 i + j`` of the 4x4 transform grid first (computed in float64)."""
    g = _G.to(weight.device)
    u = torch.einsum('ik,ockl,jl->ijco', g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


class WinogradConv:
    """A 3x3, stride-1, 'same'-padded convolution (+ bias, + activation) by F(2x2, 3x3).

    Args:
        weight: (O, C, 3, 3) float32 (BatchNorm already folded in, if any); bias: (O,) or None.
        dilation: D, in pixels (padding D).
        act, scalars: the activation after the bias: 'none', 'relu', or 'leaky_relu' with
            [negative slope] (the names of :func:`viddet.speedups.onednn.conv_act_spec`).

    Call: (N, C, H, W) float32 -> (N, O, H, W) in channels-last memory format, as
    ``act(F.conv2d(x, weight, bias, padding=D, dilation=D))`` up to float rounding. Any memory
    format of x is accepted (channels-last is read without a copy of its layout).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int = 1,
                 act: str = 'none', scalars: Sequence[float] = ()):
        if weight.dim() != 4 or weight.shape[2:] != (3, 3):
            raise ValueError(f'WinogradConv needs a 3x3 weight, got {tuple(weight.shape)}')
        if act not in ('none', 'relu', 'leaky_relu'):
            raise ValueError(f'unknown activation {act!r}')
        self.u = filter_transform(weight)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.dilation = int(dilation)
        self.act, self.scalars = act, list(scalars)
        self.in_channels, self.out_channels = weight.shape[1], weight.shape[0]

    def tiles(self, x: torch.Tensor) -> int:
        """Number of 2x2 output tiles the products of ``x`` (N, C, H, W) have."""
        n, _, h, w = x.shape
        dd = self.dilation
        return n * -(-h // (2 * dd)) * -(-w // (2 * dd)) * dd * dd

    def __call__(self, x: torch.Tensor, act: Optional[str] = None, scalars: Optional[Sequence[float]] = None) -> torch.Tensor:
        """``x`` (N, C, H, W) -> (N, O, H, W) channels-last; ``act`` / ``scalars`` override the
        activation given at construction."""
        act = self.act if act is None else act
        scalars = self.scalars if scalars is None else list(scalars)
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f'WinogradConv expects {self.in_channels} input channels, got {c}')
        dd = self.dilation
        th, tw = -(-h // (2 * dd)), -(-w // (2 * dd))
        per_image = 16 * th * tw * dd * dd * c * x.element_size()
        step = max(1, _MAX_TRANSFORM_BYTES // per_image)
        out = torch.empty(n, h, w, self.out_channels, dtype=x.dtype, device=x.device)
        for i in range(0, n, step):
            self._tiles_into(x[i:i + step], out[i:i + step], th, tw)
        if self.bias is not None:
            out.add_(self.bias)
        if act == 'relu':
            out.relu_()
        elif act == 'leaky_relu':
            torch.nn.functional.leaky_relu_(out, scalars[0])
        return out.permute(0, 3, 1, 2)

    def _tiles_into(self, x: torch.Tensor, out: torch.Tensor, th: int, tw: int) -> None:
        """The convolution (no bias) of x (n, C, H, W) into out (n, H, W, O)."""
        n, c, h, w = x.shape
        dd, o = self.dilation, self.out_channels
        # zero-padded NHWC input, D before and enough after for whole tiles
        xp = x.new_zeros(n, 2 * dd * th + 2 * dd, 2 * dd * tw + 2 * dd, c)
        xp[:, dd:dd + h, dd:dd + w].copy_(x.permute(0, 2, 3, 1))
        sn, sh, sw, sc = xp.stride()
        # d[n, ti, a, k, tj, b, l, c] = xp[n, 2D ti + a + D k, 2D tj + b + D l, c]
        d = xp.as_strided((n, th, dd, 4, tw, dd, 4, c),
                          (sn, 2 * dd * sh, sh, dd * sh, 2 * dd * sw, sw, dd * sw, sc))
        # input transform B^T d B, rows then columns; B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]
        t = x.new_empty(4, n, th, dd, tw, dd, 4, c)
        d0, d1, d2, d3 = (d[:, :, :, k] for k in range(4))
        torch.sub(d0, d2, out=t[0])
        torch.add(d1, d2, out=t[1])
        torch.sub(d2, d1, out=t[2])
        torch.sub(d1, d3, out=t[3])
        v = x.new_empty(4, 4, n, th, dd, tw, dd, c)
        t0, t1, t2, t3 = (t[..., j, :] for j in range(4))
        torch.sub(t0, t2, out=v[:, 0])
        torch.add(t1, t2, out=v[:, 1])
        torch.sub(t2, t1, out=v[:, 2])
        torch.sub(t1, t3, out=v[:, 3])
        tiles = n * th * dd * tw * dd
        m = torch.bmm(v.view(16, tiles, c), self.u).view(4, 4, n, th, dd, tw, dd, o)
        # output transform A^T m A; A^T = [[1,1,1,0],[0,1,-1,-1]]
        s = x.new_empty(2, 4, n, th, dd, tw, dd, o)
        torch.add(m[0], m[1], out=s[0]).add_(m[2])
        torch.sub(m[1], m[2], out=s[1]).sub_(m[3])
        exact = h == 2 * dd * th and w == 2 * dd * tw and out.is_contiguous()
        y = out.view(n, th, 2, dd, tw, 2, dd, o) if exact else x.new_empty(n, th, 2, dd, tw, 2, dd, o)
        yt = y.permute(2, 5, 0, 1, 3, 4, 6, 7)                # [m_row, m_col, n, ti, a, tj, b, O]
        for r in range(2):
            s0, s1, s2, s3 = (s[r, j] for j in range(4))
            torch.add(s0, s1, out=yt[r, 0]).add_(s2)
            torch.sub(s1, s2, out=yt[r, 1]).sub_(s3)
        if not exact:                                         # (n, rows, cols, O) of whole tiles
            out.copy_(y.view(n, 2 * dd * th, 2 * dd * tw, o)[:, :h, :w])


class OrDirect:
    """Runs ``winograd`` (a :class:`WinogradConv`) on inputs of at least :data:`MIN_TILES` output
    tiles and ``direct`` (another implementation of the same convolution, called the same way)
    on smaller ones."""

    def __init__(self, winograd: WinogradConv, direct):
        self.winograd, self.direct = winograd, direct

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        conv = self.winograd if self.winograd.tiles(x) >= MIN_TILES else self.direct
        return conv(x, *args, **kwargs)
