"""Dilated ("DC5") ResNet / ResNeXt backbones exactly as mmdet builds them for MMTracking VID.

REFERENCE.md §1.1 (mmdet ``ResNet``/``ResNeXt``, ``style='pytorch'``, ``strides=(1,2,2,1)``,
``dilations=(1,1,1,2)``, ``out_indices=(3,)``, ``frozen_stages=1``, ``norm_eval=True``).

Differences from torchvision's ``replace_stride_with_dilation`` that matter for checkpoint parity:
the dilation (2) applies to *every* block of layer4, including its first block, and layer4's
downsample conv has stride 1. Output: the layer4 map, 2048 channels at stride 16.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from viddet.models import fused

# depth -> blocks per stage
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class FrozenStagesMixin:
    """``train()`` that keeps a backbone's frozen stages (``frozen_modules()``, requires_grad=False)
    and, with ``norm_eval``, every BatchNorm in eval mode (mmdet ``frozen_stages`` / ``norm_eval``)."""

    norm_eval: bool = True

    def frozen_modules(self) -> List[nn.Module]:
        raise NotImplementedError

    def freeze(self) -> None:
        """Puts the frozen modules in eval mode and stops their gradients."""
        for m in self.frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        """Sets training mode, except for the frozen stages and (norm_eval) every BatchNorm."""
        nn.Module.train(self, mode)
        self.freeze()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


class Bottleneck(nn.Module):
    """ResNet/ResNeXt bottleneck, pytorch style (stride on the 3x3 conv).

    Args:
        inplanes: input channels. planes: base width (output = 4 * planes).
        stride, dilation: of the 3x3 conv (padding = dilation).
        groups, base_width: ResNeXt cardinality and width per group (groups=1 -> plain ResNet);
            width = floor(planes * base_width / 64) * groups as in mmdet ``ResNeXt``.
        downsample: the projection shortcut (1x1 conv + BN) or None.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, base_width: int = 4, downsample: nn.Module = None):
        super().__init__()
        width = planes if groups == 1 else (planes * base_width // 64) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation,
                               groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetDC5(FrozenStagesMixin, nn.Module):
    """ResNet-50/101 or ResNeXt-101 (64x4d) with a dilated, stride-1 layer4 (total stride 16).

    Args:
        depth: 50, 101 or 152.
        groups, base_width: 1/64 for ResNet; 64/4 for ResNeXt-101 64x4d.
        frozen_stages: stem and layers 1..frozen_stages get requires_grad=False (default 1).
        norm_eval: keep every BatchNorm in eval mode (running statistics) while training.

    Input (N, 3, H, W) normalised RGB; output (N, 2048, ceil(H/16), ceil(W/16)).
    State-dict keys match mmdet's (``conv1``, ``bn1``, ``layerL.B.convK``, ``layerL.0.downsample.{0,1}``).
    """

    out_channels = 2048

    def __init__(self, depth: int = 50, groups: int = 1, base_width: int = 64,
                 frozen_stages: int = 1, norm_eval: bool = True):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f'ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
        for i, num_blocks in enumerate(RESNET_DEPTHS[depth]):
            planes = 64 * 2 ** i
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=strides[i], bias=False),
                nn.BatchNorm2d(planes * 4))
            blocks: List[nn.Module] = [Bottleneck(inplanes, planes, strides[i], dilations[i], groups,
                                                  base_width, downsample)]
            inplanes = planes * 4
            blocks += [Bottleneck(inplanes, planes, 1, dilations[i], groups, base_width)
                       for _ in range(1, num_blocks)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
        self.freeze()
        self._fused = fused.FusedCache()

    def frozen_modules(self) -> List[nn.Module]:
        """The stem and layers 1..frozen_stages (none when frozen_stages < 0)."""
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fast_path(self, x):
            try:
                return self._forward_fused(x)
            except RuntimeError as e:  # private kernels missing or changed: plain path from now on
                fused.disable(e)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def _fused_convs(self, _module=None) -> Dict[str, 'fused.FusedConv']:
        convs = {'stem': fused.FusedConv(self.conv1, self.bn1)}
        for name, blk in self.named_modules():
            if isinstance(blk, Bottleneck):
                convs[name + '.1'] = fused.FusedConv(blk.conv1, blk.bn1)
                convs[name + '.2'] = fused.FusedConv(blk.conv2, blk.bn2)
                convs[name + '.3'] = fused.FusedConv(blk.conv3, blk.bn3)
                if blk.downsample is not None:
                    convs[name + '.ds'] = fused.FusedConv(blk.downsample[0], blk.downsample[1])
        return convs

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """CPU float32 inference: each conv runs with its BN folded in and ReLU / residual add as
        oneDNN post-ops (:mod:`viddet.models.fused`); same values as :meth:`forward` up to rounding."""
        f = self._fused.get(self, self._fused_convs)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(f['stem'](x, 'relu'))
        for i in range(1, 5):
            for j in range(len(getattr(self, f'layer{i}'))):
                name = f'layer{i}.{j}'
                identity = f[name + '.ds'](x) if name + '.ds' in f else x
                out = f[name + '.2'](f[name + '.1'](x, 'relu'), 'relu')
                x = f[name + '.3'](out, 'relu', add=identity)
        return x


def build_backbone(name: str) -> nn.Module:
    """Backbone by short name: ``r50``, ``r101`` or ``x101`` (ResNeXt-101 64x4d), all DC5.

    Raises:
        ValueError: unknown name.
    """
    if name == 'r50':
        return ResNetDC5(50)
    if name == 'r101':
        return ResNetDC5(101)
    if name == 'x101':
        return ResNetDC5(101, groups=64, base_width=4)
    if name == 'mobilenetv2':
        from viddet.models.mobilenet import MobileNetV2Lite
        return MobileNetV2Lite()
    raise ValueError(f'unknown backbone {name!r}: choose r50, r101, x101 or mobilenetv2')
