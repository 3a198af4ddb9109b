"""The fast modules of the Faster R-CNN DC5 detector (:mod:`viddet.models.detector`,
:mod:`viddet.models.backbones`): each a subclass of the plain module that computes the same values
(up to float rounding; NMS exactly) faster at inference, and runs the plain method wherever its
fast path does not apply (protocol: :mod:`viddet.models.fast`).

* :class:`FastResNetDC5`, :class:`FastConvAct` (the neck), :class:`FastRPNHead`: fused oneDNN
  convolutions with BN folded in, ReLU and residual add as post-ops, channels-last; wide 3x3 convs
  by Winograd F(2x2, 3x3) where ``kernels.winograd`` (:mod:`viddet.speedups.onednn`,
  :mod:`viddet.speedups.winograd`).
* :class:`FastLinear` (the RoI head's fully connected layers): one GEMM on the transposed weight
  (MKL), or oneDNN's inner product where ``kernels.gemm`` says so.
* :class:`FastRPNHead`, :class:`FastRoIHead`: NMS that stops at the last box used
  (:mod:`viddet.speedups.nms`).
* :class:`FastSingleRoIExtractor`: RoIAlign as bilinear taps gathered with ``embedding_bag``
  (:mod:`viddet.speedups.roi_align`).
"""
from __future__ import annotations

import torch
from torch import nn

from viddet.models.backbones import Bottleneck, ResNetDC5
from viddet.models.detector import RoIHead, RPNHead, SingleRoIExtractor
from viddet.models.fast import FastModule
from viddet.models.layers import ConvAct
from viddet.runtime import CpuKernels
from viddet.speedups.nms import head_nms
from viddet.speedups.onednn import FusedCache, FusedConv, conv_act_spec, fused_applies, fused_or_winograd, matmul_nt
from viddet.speedups.roi_align import roi_align_gathered

__all__ = ['EarlyStopNMS', 'FastResNetDC5', 'FastConvAct', 'FastRPNHead', 'FastLinear', 'FastRoIHead', 'FastSingleRoIExtractor']


class FastResNetDC5(FastModule, ResNetDC5):
    """:class:`ResNetDC5` with each conv's BN folded in and ReLU / residual add as oneDNN post-ops,
    in channels-last memory format (~25% faster backbone at 1000x600; oneDNN's convolutions are
    ~30% faster on NHWC than on NCHW), and the wide stride-1 3x3 convolutions (layers 2-4) by
    Winograd's F(2x2, 3x3) where ``kernels.winograd``; same values up to rounding.

    Attributes:
        fused: the folded convolutions (:class:`viddet.speedups.onednn.FusedCache`): the stem, then
            (conv1, conv2, conv3, downsample or None) of every bottleneck in order.
    """

    fast_attributes = ('fused',)

    def __init__(self, plain: ResNetDC5, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.fused = FusedCache()

    def _fold(self, _) -> dict:
        blocks = [(FusedConv(b.conv1, b.bn1), fused_or_winograd(b.conv2, b.bn2, self.kernels.winograd),
                   FusedConv(b.conv3, b.bn3), None if b.downsample is None else FusedConv(*b.downsample))
                  for b in self.modules() if isinstance(b, Bottleneck)]
        return {'stem': FusedConv(self.conv1, self.bn1), 'blocks': blocks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 2048, ceil(H/16), ceil(W/16)) channels-last, as
        :meth:`ResNetDC5.forward`."""
        if not fused_applies(self, x):
            return super().forward(x)
        f = self.fused.get(self, self._fold)
        x = self.maxpool(f['stem'](x.contiguous(memory_format=torch.channels_last), 'relu'))
        for conv1, conv2, conv3, downsample in f['blocks']:
            identity = x if downsample is None else downsample(x)
            x = conv3(conv2(conv1(x, 'relu'), 'relu'), 'relu', add=identity)
        return x


class FastConvAct(FastModule, ConvAct):
    """A :class:`viddet.models.layers.ConvAct` (the neck's conv + ReLU) as one fused conv +
    activation primitive, or by Winograd's F(2x2, 3x3) where ``kernels.winograd`` and it applies
    (the DC5 neck's 3x3 2048 -> 512)."""

    fast_attributes = ('fused',)

    def __init__(self, plain: ConvAct, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.fused = FusedCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_applies(self, x):
            return super().forward(x)
        conv = self.fused.get(self, lambda m: {'conv': fused_or_winograd(m.conv, None, m.kernels.winograd)})['conv']
        act, scalars = conv_act_spec(self.act)
        return conv(x, act, scalars)


class EarlyStopNMS:
    """The ``nms`` of a fast head (a base class before :class:`viddet.models.fast.FastModule`):
    ``RPNHead.nms`` / ``RoIHead.nms`` by :func:`viddet.speedups.nms.head_nms`, which stops at the
    ``max_keep``-th kept box (the same indices in the same order); the head's own ``nms`` where that
    does not apply. Also the RPN head of an ONNX export (``viddet.export.stages``), whose convs are a
    graph but whose NMS is this one."""

    def nms(self, boxes, scores, idxs, iou_threshold: float, max_keep: int) -> torch.Tensor:
        keep = head_nms(boxes, scores, idxs, iou_threshold, max_keep)
        return super().nms(boxes, scores, idxs, iou_threshold, max_keep) if keep is None else keep


class FastRPNHead(EarlyStopNMS, FastModule, RPNHead):
    """:class:`RPNHead` with its 3x3 conv + ReLU fused (Winograd for the 512-channel head where
    ``kernels.winograd``), the two 1x1 convs as oneDNN primitives, and an NMS that stops at the
    ``max_keep``-th kept box (:func:`viddet.speedups.nms.head_nms`: the same boxes)."""

    fast_attributes = ('fused',)

    def __init__(self, plain: RPNHead, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.fused = FusedCache()

    def forward(self, x: torch.Tensor):
        if not fused_applies(self, x):
            return super().forward(x)
        f = self.fused.get(self, lambda m: {'conv': fused_or_winograd(m.rpn_conv, None, m.kernels.winograd),
                                            'cls': FusedConv(m.rpn_cls), 'reg': FusedConv(m.rpn_reg)})
        x = f['conv'](x, 'relu')
        return f['cls'](x), f['reg'](x)


class FastRoIHead(EarlyStopNMS, FastModule, RoIHead):
    """:class:`RoIHead` with an NMS that stops at the ``max_keep``-th kept (box, class) pair
    (:func:`viddet.speedups.nms.head_nms`: the same detections)."""


class FastLinear(FastModule, nn.Linear):
    """``nn.Linear`` on 2-D float32 CPU input as one GEMM: with ``kernels.gemm == 'onednn'`` by
    oneDNN's inner product, else with MKL against the weight stored transposed (in x out, cached per
    weight version), which the GEMM then reads in its natural row-major order. For the box head's
    25088 -> 1024 fc on 300 RoIs at one thread this is 129 ms against 146 ms (``F.linear``) and 141
    ms (oneDNN) on an Intel AVX-512 Xeon, 387 / 763 / 499 ms with AVX2 only; on an AMD AVX-512 EPYC
    (Zen 5) oneDNN's 77 ms against MKL's 162. Same values up to summation order."""

    fast_attributes = ('transposed',)

    def __init__(self, plain: nn.Linear, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.transposed = FusedCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or not fused_applies(self, x):
            return super().forward(x)
        if self.kernels.gemm == 'onednn':
            return matmul_nt(x, self.weight, self.bias, gemm='onednn')
        wt = self.transposed.get(self, lambda m: {'wt': m.weight.detach().t().contiguous()})['wt']
        return torch.addmm(self.bias, x, wt) if self.bias is not None else x.mm(wt)


class FastSingleRoIExtractor(FastModule, SingleRoIExtractor):
    """:class:`SingleRoIExtractor` whose RoIAlign is a weighted gather of bilinear taps
    (:func:`viddet.speedups.roi_align.roi_align_gathered`, ~4x faster than torchvision's CPU kernel
    for 300 RoIs) without autograd and with a fixed sampling ratio; the result is float32, a
    permuted view of an (n, 7, 7, C) tensor."""

    def roi_align(self, feats: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.sampling_ratio <= 0 or feats.dim() != 4 or rois.dim() != 2:
            return super().roi_align(feats, rois)
        return roi_align_gathered(feats, rois, self.output_size, self.spatial_scale, self.sampling_ratio)
