"""The backbones: dilated ("DC5") ResNet / ResNeXt exactly as mmdet builds them for MMTracking VID,
and the table of every backbone viddet knows (:data:`BACKBONES`).

MMTracking's ``configs/_base_/models/faster_rcnn_r50_dc5.py``: mmdet ``ResNet`` (``mmdet/models/
backbones/resnet.py``) with ``depth=50``, ``style='pytorch'``, ``strides=(1, 2, 2, 1)``,
``dilations=(1, 1, 1, 2)``, ``out_indices=(3,)``, ``frozen_stages=1``, ``norm_eval=True``; the
R-101 / X-101 configs change only the depth (and ``type='ResNeXt', groups=64, base_width=4``).

Differences from torchvision's ``replace_stride_with_dilation`` that matter for checkpoint parity:
the dilation (2) applies to *every* block of layer4, including its first block, and layer4's
downsample conv has stride 1. Output: the layer4 map, 2048 channels at stride 16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from viddet.errors import VidDetError
from viddet.models.layers import FrozenStagesMixin
from viddet.models.mobilenet import MobileNetV2Lite

# depth -> blocks per stage
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


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

    def frozen_modules(self) -> List[nn.Module]:
        """The stem and layers 1..frozen_stages (none when frozen_stages < 0)."""
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised RGB -> (N, 2048, ceil(H/16), ceil(W/16))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


@dataclass(frozen=True)
class Backbone:
    """What viddet knows about one backbone.

    Attributes:
        name: the short name used in configs, the CLI and messages (``r50``).
        title: the name in papers and tables (``R-50``).
        build: constructs the module (ImageNet-initialisable, stride 16).
        imagenet_weights: the model-zoo name of its ImageNet initialisation (what MMTracking's
            configs call ``torchvision://resnet50``), or None when there is none to download.
    """
    name: str
    title: str
    build: Callable[[], nn.Module]
    imagenet_weights: Optional[str] = None


BACKBONES = (
    Backbone('r50', 'R-50', lambda: ResNetDC5(50), 'torchvision://resnet50'),
    Backbone('r101', 'R-101', lambda: ResNetDC5(101), 'torchvision://resnet101'),
    Backbone('x101', 'X-101', lambda: ResNetDC5(101, groups=64, base_width=4), 'open-mmlab://resnext101_64x4d'),
    Backbone('mobilenetv2', 'MobileNetV2-lite', MobileNetV2Lite, None),
)
"""Every backbone, in the order the CLI lists them."""

BACKBONE_NAMES = tuple(b.name for b in BACKBONES)


def backbone_info(name: str) -> Backbone:
    """The :class:`Backbone` entry of ``name``.

    Raises:
        VidDetError: unknown name (listing the known ones).
    """
    for b in BACKBONES:
        if b.name == name:
            return b
    raise VidDetError(f'unknown backbone {name!r}: choose one of {", ".join(BACKBONE_NAMES)}')


def build_backbone(name: str) -> nn.Module:
    """The backbone module of ``name`` (see :data:`BACKBONES`), with its default initialisation.

    Raises:
        VidDetError: unknown name.
    """
    return backbone_info(name).build()


def backbone_of_state_dict(state: Dict[str, torch.Tensor], prefix: str = 'detector.') -> Optional[str]:
    """The backbone name of a checkpoint, read off its keys under ``prefix + 'backbone.'``:
    ResNet depth from layer3's block count (6 -> 50, 23 -> 101), ResNeXt from a grouped layer1
    conv2, MobileNetV2-lite from ``features.*``; None when no known backbone is there."""
    import re
    head = prefix + 'backbone.'
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(head) + r'layer3\.(\d+)\.', k))}
    if blocks:
        depth = {6: 50, 23: 101}.get(max(blocks) + 1)
        w = state.get(head + 'layer1.0.conv2.weight')
        grouped = w is not None and w.shape[1] != w.shape[0]
        return (('x' if grouped else 'r') + str(depth)) if depth else None
    if any(k.startswith(head + 'features.') for k in state):
        return 'mobilenetv2'
    return None
