"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3): 36 multiplications per 4x4 output
tile and input channel where a direct convolution needs 144 (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016, section 4.2, the interpolation points 0, +-1, +-2).

For an output tile Y (4x4) of one output channel and the input tile d (6x6) of each input channel::

    Y = A^T [ sum over channels of (G g G^T) * (B^T d B) ] A        (* elementwise, 6x6)

so the convolution becomes 36 independent matrix products (tiles x C) @ (C x O), one per position
of the 6x6 transform grid, 4x fewer multiplications than the direct convolution. The input and
output transforms are each two small matrix products here, B^T (A^T) along the tiles' rows then
along their columns (5-10% faster per convolution than one product by ``kron(B^T, B^T)``, 36 x 36,
which does 3x the multiplications); the filter transform is done once per weight version.

Where it pays: the 36 products are one batched product (``torch.bmm``; at these shapes, K = C =
256-512, PyTorch's BLAS and oneDNN both run at ~75 GFLOP/s on one core of the AMD EPYC measured,
where oneDNN's direct convolution runs at ~110). There, a 576 x 576 frame's 3x3 convolution + bias
+ SiLU against oneDNN's direct kernel (one thread, 12 frames): 256 channels at 72 x 72 1.6x faster,
at 36 x 36 1.75x, 512 at 18 x 18 1.75x, 256 at 18 x 18 1.4x; 128 at 72 x 72 1.2-1.3x, and 64 at
144 x 144 0.86x (the transforms' memory traffic outweighs the saving). In YOLOV-L's forward (12
frames, one thread, a busy machine) its 27 convolutions of 256 and 512 channels took 0.27 instead
of 0.43 s per frame, the forward 0.95 instead of 1.15 s; with the 128-channel ones as well (once
the backbone ran 4 frames at a time and the transforms were separable) the forward was another
4-5% faster (YOLOV-S 5-7%), with the 64-channel ones no faster again: :data:`MIN_CHANNELS`.
YOLOX's fast convolutions use it (:class:`viddet.speedups.yolox.FastBaseConv`, where
``kernels.winograd4``: :func:`viddet.runtime.cpu_kernels`).

Values: G has the fractions 1/4, 1/6, 1/12, 1/24 and A, B the integers up to 8, so the rounding is
larger than a direct convolution's: max absolute error against a float64 convolution 1.7e-5 for
outputs of magnitude ~2.5 (direct: 4e-6 to 6e-6), bounded by ``tests/test_winograd4.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['Winograd4Conv', 'applies', 'MIN_CHANNELS']

MIN_CHANNELS = 128
"""Narrowest convolution (input and output channels) :func:`applies` takes. In the forward of
YOLOV-S and -L (12 frames, one and two threads, alternated in one process on the 2-core AMD EPYC):
128 instead of 256 was 4-7% faster, 64 instead of 128 no faster (S 1% slower, L the same); alone,
64 channels at 144 x 144 ran 0.86x the direct kernel's speed."""

CHUNK_BYTES = 20 << 20
"""Frames are transformed together while their transformed inputs and products (36 x tiles x
(C + O) floats) stay within this many bytes: few enough to stay in the cache (12 frames of
256 channels at 72 x 72 at once are 1.6x slower than one at a time), enough rows for efficient
products on small maps (512 channels at 18 x 18, 25 tiles per frame: 4 frames at once 1.25x faster
than one; measured on the 2-core AMD EPYC, batch 12)."""

_BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                    [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                   dtype=torch.float64)
_BT32, _AT32 = _BT.float(), _AT.float()


def applies(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution :class:`Winograd4Conv` computes and speeds up: ``nn.Conv2d``,
    3x3, stride 1, padding 1, no dilation or groups, zero padding, at least :data:`MIN_CHANNELS`
    input and output channels."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == 'zeros' and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)


class Winograd4Conv:
    """A 3x3, stride-1, padding-1 convolution (+ bias, + SiLU) by F(4x4, 3x3), frames taken together
    within :data:`CHUNK_BYTES`.

    Args:
        weight: (O, C, 3, 3) float32 (BatchNorm already folded in); bias: (O,) or None.

    Call ``conv(x, act)``: x (N, C, H, W) float32, any memory format; act ``'none'`` or ``'swish'``
    (SiLU) -> (N, O, H, W) channels-last, ``act(F.conv2d(x, weight, bias, padding=1))`` up to float
    rounding (module docstring).

    Raises:
        ValueError: a weight that is not 3x3, an input of another channel count, another activation.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        if weight.dim() != 4 or weight.shape[2:] != (3, 3):
            raise ValueError(f'Winograd4Conv needs a 3x3 weight, got {tuple(weight.shape)}')
        u = torch.einsum('ik,ockl,jl->ijoc', _G, weight.detach().double(), _G)
        self.u = u.reshape(36, weight.shape[0], weight.shape[1]).transpose(1, 2).float().contiguous()  # (36, C, O)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.in_channels, self.out_channels = weight.shape[1], weight.shape[0]

    def __call__(self, x: torch.Tensor, act: str = 'none') -> torch.Tensor:
        if act not in ('none', 'swish'):
            raise ValueError(f'Winograd4Conv: unknown activation {act!r}')
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f'Winograd4Conv expects {self.in_channels} input channels, got {c}')
        out = x.new_empty(n, h, w, self.out_channels)
        nhwc = x.permute(0, 2, 3, 1)
        per_frame = 36 * -(-h // 4) * -(-w // 4) * (c + self.out_channels) * x.element_size()
        step = max(1, CHUNK_BYTES // per_frame)                          # frames per set of products
        for f in range(0, n, step):
            self._frames(nhwc[f:f + step], out[f:f + step])
        if self.bias is not None:
            out.add_(self.bias)
        if act == 'swish':
            F.silu(out, inplace=True)
        return out.permute(0, 3, 1, 2)

    def _frames(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The convolution (no bias) of frames x (n, H, W, C) into out (n, H, W, O)."""
        n, h, w, c = x.shape
        th, tw = -(-h // 4), -(-w // 4)
        padded = x.new_zeros(n, 4 * th + 2, 4 * tw + 2, c)
        padded[:, 1:1 + h, 1:1 + w] = x
        sn, sh, sw, sc = padded.stride()
        # d[k, l, f, ti, tj, c] = padded[f, 4 ti + k, 4 tj + l, c]: the 6x6 input tiles, overlapping by 2
        d = padded.as_strided((6, 6, n, th, tw, c), (sh, sw, sn, 4 * sh, 4 * sw, sc)).reshape(6, -1)
        tiles = n * th * tw
        v = torch.matmul(_BT32, torch.mm(_BT32, d).view(6, 6, -1)).view(36, tiles, c)     # B^T d B
        o = self.out_channels
        m = torch.bmm(v, self.u)                                       # the 36 products
        y = torch.matmul(_AT32, torch.mm(_AT32, m.view(6, -1)).view(4, 6, -1)).view(4, 4, n, th, tw, o)  # A^T m A
        whole = y.permute(2, 3, 0, 4, 1, 5).reshape(n, 4 * th, 4 * tw, o)
        out.copy_(whole[:, :h, :w])
