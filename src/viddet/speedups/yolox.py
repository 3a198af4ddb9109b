"""The fast modules of YOLOX and the YOLOV / YOLOV++ heads (:mod:`viddet.models.yolox`,
:mod:`viddet.models.yolov_head`): each a subclass of the plain module that computes the same values
(up to float rounding) faster at inference, and runs the plain method wherever its fast path does
not apply (protocol: :mod:`viddet.models.fast`).

* :class:`FastBaseConv`: conv + BatchNorm + SiLU as one oneDNN primitive (BN folded into the conv's
  weight and bias, SiLU as its ``swish`` post-op) in channels-last memory format. Every convolution
  of CSPDarknet, the PAFPN and the head's towers is one: the plain modules run them as a conv
  (PyTorch takes its slow im2col kernel for the 1x1 ones), a BN pass and a SiLU pass, all NCHW, and
  the SPP max pools of an NCHW map are ~15x slower than of a channels-last one (which the fused
  convs hand on). Where ``kernels.winograd`` (by default on CPUs without AVX-512), the 3x3
  stride-1 convs of >= 128 channels run by Winograd F(2x2, 3x3) (:mod:`viddet.speedups.winograd`),
  one frame at a time (for a batch of 12 frames at once its transforms leave the cache: 2.3x slower
  than per frame). On the AVX-512 AMD CPU measured it is off by default, as everywhere with
  AVX-512: there it is 1.2-1.5x faster than oneDNN's direct kernel per frame at 256-512 channels but
  2x slower at 128 (YOLOV-L 8% faster with it on ``>= 256`` only; ``benchmarks/RESULTS.md``).
* :class:`FastYOLOVHead`, :class:`FastYOLOVPPHead`: the second class tower (``cls_convs2``), whose
  features only the selected candidates use, computed at the candidates' anchors only (and the
  3x3 neighbourhoods its second conv reads) as gathered 3x3 patches times the folded weights,
  instead of over every anchor of the three levels (:func:`tower_at`): a third of the head's
  convolution work for YOLOV's 30 candidates per frame.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from viddet.models.fast import FastModule
from viddet.models.yolov_head import YOLOVHead, YOLOVPPHead
from viddet.models.yolox import BaseConv
from viddet.runtime import CpuKernels
from viddet.speedups import winograd
from viddet.speedups.onednn import FusedCache, FusedConv, fused_applies, fused_or_winograd, matmul_nt

__all__ = ['FastBaseConv', 'SparseCls2', 'FastYOLOVHead', 'FastYOLOVPPHead', 'conv3x3_at', 'tower_at']

DENSE_FRACTION = 0.5
"""A level whose first ``cls_convs2`` conv is needed at more than this fraction of its anchors
(the candidates' 3x3 neighbourhoods) runs the dense tower (:func:`tower_at`)."""


class FastBaseConv(FastModule, BaseConv):
    """:class:`BaseConv` (conv -> BN, eps 1e-3 -> SiLU) as one fused oneDNN convolution with the BN
    folded in and SiLU as the ``swish`` post-op, in channels-last memory format (its output is
    channels-last; any layout of the input is taken). Same values up to float rounding.

    Attributes:
        fused: the folded convolution (:class:`viddet.speedups.onednn.FusedCache`).
    """

    fast_attributes = ('fused',)

    def __init__(self, plain: BaseConv, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.fused = FusedCache()

    def folded(self):
        """The conv with the BN folded in (cached until a parameter, buffer or the kernels change):
        a :class:`FusedConv`, or where ``kernels.winograd`` and it applies (3x3, stride 1, >= 128
        channels) a :class:`viddet.speedups.winograd.OrDirect`."""
        return self.fused.get(self, lambda m: {'conv': fused_or_winograd(m.conv, m.bn, m.kernels.winograd)})['conv']

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_applies(self, x):
            return super().forward(x)
        conv = self.folded()
        x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(conv, winograd.OrDirect):   # one frame at a time: its transforms stay in cache
            return F.silu(torch.cat([conv(frame) for frame in x.split(1)]), inplace=True)
        return conv(x, 'swish')


def conv3x3_at(x: torch.Tensor, conv: FusedConv, b: torch.Tensor, y: torch.Tensor, xs: torch.Tensor,
               gemm: str = 'mkl') -> torch.Tensor:
    """SiLU of a 3x3, stride-1, padding-1 convolution (+ bias) at some locations only.

    Args:
        x: (B, H + 2, W + 2, C) the zero-padded input, location-major (NHWC).
        conv: the convolution (weight (O, C, 3, 3), bias (O,)), BN folded in.
        b, y, xs: (P,) frame, row and column of each output location (unpadded coordinates).
        gemm: the GEMM library (:func:`viddet.speedups.onednn.matmul_nt`).

    Returns:
        (P, O): ``silu(conv(x))[b, :, y, xs]``, the 3x3 patches times the weight as one GEMM
        (the same sums as the direct convolution, in another order).
    """
    ky, kx = torch.meshgrid(torch.arange(3), torch.arange(3), indexing='ij')
    rows = (y[:, None] + ky.reshape(1, 9), xs[:, None] + kx.reshape(1, 9))
    patches = x[b[:, None], rows[0], rows[1]].reshape(len(b), -1)          # (P, 9C): (ky, kx, c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)
    return F.silu(matmul_nt(patches, weight, conv.bias, gemm))


def tower_at(x: torch.Tensor, convs: Sequence[FusedConv], b: torch.Tensor, y: torch.Tensor,
             xs: torch.Tensor, gemm: str = 'mkl') -> torch.Tensor:
    """Two stacked 3x3 conv + BN + SiLU (a ``cls_convs2`` tower, BN folded) at some locations.

    The first conv runs at the in-map 3x3 neighbourhoods of the locations (all the second one
    reads; the rest of its map stays zero, as is its padding), the second at the locations, both
    by :func:`conv3x3_at`; where the neighbourhoods cover more than :data:`DENSE_FRACTION` of the
    map, the two convolutions run densely (oneDNN) and are gathered.

    Args:
        x: (B, C, H, W) the tower's input (the head's stem output of one level).
        convs: the two folded convolutions.
        b, y, xs: (P,) frame, row and column of each location.

    Returns:
        (P, C) the tower's output at the locations.
    """
    n, _, h, w = x.shape
    need = torch.zeros(n, 1, h, w, dtype=x.dtype, device=x.device)
    need[b, 0, y, xs] = 1
    need = F.max_pool2d(need, 3, 1, 1)[:, 0] > 0                              # 3x3 neighbourhoods
    nb, ny, nx = torch.nonzero(need, as_tuple=True)
    if len(nb) > DENSE_FRACTION * need.numel():
        x = x.contiguous(memory_format=torch.channels_last)
        out = convs[1](convs[0](x, 'swish'), 'swish')
        return out.permute(0, 2, 3, 1)[b, y, xs]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))               # (B, H + 2, W + 2, C)
    first = padded.new_zeros(n, h + 2, w + 2, convs[0].weight.shape[0])
    first[nb, ny + 1, nx + 1] = conv3x3_at(padded, convs[0], nb, ny, nx, gemm)
    return conv3x3_at(first, convs[1], b, y, xs, gemm)


class SparseCls2:
    """``cls2_at`` of a fast video head (a base class before :class:`viddet.models.fast.FastModule`):
    the ``cls_convs2`` features of the candidates only (:func:`tower_at` per level), where the
    plain head computes them over every anchor and gathers; the plain ``cls2_at`` where the fused
    kernels do not apply."""

    fast_attributes = ('folded',)

    def __init__(self, plain, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.folded = FusedCache()

    def _fold(self, _) -> dict:
        return {'towers': [[FusedConv(m.conv, m.bn) for m in tower] for tower in self.cls_convs2]}

    def cls2_at(self, stems: Sequence[torch.Tensor], idx: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if not fused_applies(self, stems[0]):
            return super().cls2_at(stems, idx)
        towers = self.folded.get(self, self._fold)['towers']
        frame = torch.cat([torch.full((len(i),), k, dtype=torch.long) for k, i in enumerate(idx)])
        anchor = torch.cat(list(idx)).long()
        out = stems[0].new_empty(len(anchor), stems[0].shape[1])
        start = 0
        for x, convs in zip(stems, towers):
            h, w = x.shape[-2:]
            here = (anchor >= start) & (anchor < start + h * w)
            if bool(here.any()):
                local = anchor[here] - start
                out[here] = tower_at(x, convs, frame[here], local // w, local % w, self.kernels.gemm)
            start += h * w
        return list(out.split([len(i) for i in idx]))


class FastYOLOVHead(SparseCls2, FastModule, YOLOVHead):
    """:class:`YOLOVHead` with the candidates' ``cls_convs2`` features computed at the candidates
    only (:class:`SparseCls2`); its convolutions are :class:`FastBaseConv`."""


class FastYOLOVPPHead(SparseCls2, FastModule, YOLOVPPHead):
    """:class:`YOLOVPPHead` with the candidates' ``cls_convs2`` features computed at the candidates
    only (:class:`SparseCls2`); its convolutions are :class:`FastBaseConv`."""
