"""Building blocks shared by the detector, FlowNet and the aggregators.

* :class:`ConvAct`: a convolution + optional activation with its parameters at ``conv.*`` — the
  role of mmcv's ``ConvModule`` without a norm layer, so that MMTracking checkpoint keys such as
  ``neck.convs.0.conv.weight`` or ``motion.conv1.0.conv.weight`` load unchanged.
* :class:`FrozenStagesMixin`: mmdet's ``frozen_stages`` / ``norm_eval`` behaviour of backbones.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn


class ConvAct(nn.Module):
    """A convolution followed by an optional activation, parameters at ``conv.*``.

    mmcv builds ``Conv``/``Conv2d`` as ``nn.Conv2d`` and ``deconv`` as ``nn.ConvTranspose2d``
    (weight layout (in, out, k, k)); the order is conv then activation.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as ``nn.Conv2d``.
        bias: whether the conv has a bias.
        transposed: build ``nn.ConvTranspose2d`` (mmcv ``conv_cfg=dict(type='deconv')``).
        act: ``None`` (no activation), ``'relu'`` or ``'leaky_relu'``.
        negative_slope: slope of the LeakyReLU (FlowNetSimple uses 0.1).

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, transposed: bool = False,
                 act: Optional[str] = None, negative_slope: float = 0.1):
        super().__init__()
        conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv_cls(in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding, bias=bias)
        if act is None:
            self.act = None
        elif act == 'relu':
            self.act = nn.ReLU(inplace=True)
        elif act == 'leaky_relu':
            self.act = nn.LeakyReLU(negative_slope, inplace=True)
        else:
            raise ValueError(f'unknown activation {act!r}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.act is None else self.act(x)


class FrozenStagesMixin:
    """``train()`` that keeps a backbone's frozen stages (``frozen_modules()``, requires_grad=False)
    and, with ``norm_eval``, every BatchNorm in eval mode (mmdet ``ResNet._freeze_stages`` and
    ``ResNet.train`` with ``norm_eval=True``)."""

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
