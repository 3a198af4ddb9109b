"""Fast paths: faster ways to compute exactly what the plain modules compute, for inference.

The modules in :mod:`viddet.models` and :mod:`viddet.methods` are the readable reference
implementation of the papers (and what training uses). This package holds every equivalent fast
path, each in the file of its idea, and installs them on a model with one call::

    speedups.enable(model)    # what viddet's inference does by default
    speedups.disable(model)   # back to the plain modules (export, FLOP counting, debugging)

(or ``VideoDetector.from_checkpoint(..., fast=False)``, ``--set test.fast=false`` on the command
line). ``enable`` replaces the method of a module *instance* (``module.forward``, FGFA's
``aggregate``) by a dispatcher that runs the fast function and falls back to the class's plain
method wherever the fast one does not apply (autograd on, another device or dtype, a configuration
it does not cover). The state dict, the parameters and the module types stay the same.

=====================================  ===================================================
fast path                              replaces
=====================================  ===================================================
:func:`onednn.resnet_forward`          ``ResNetDC5.forward``: BN folded into the convs, ReLU
                                       and residual add as oneDNN post-ops, channels-last;
                                       wide 3x3 convs by Winograd F(2x2, 3x3)
                                       (:mod:`winograd`)
:func:`flownet.flownet_forward_prepared`  ``FlowNetSimple.forward_prepared``: packed oneDNN
                                       weights, sub-pixel transposed convs, tap-sum flow convs
:func:`flownet.flownet_forward_features`  ``FlowNetSimple.forward_features``: the same layers,
                                       the flow resized to the feature grid from the
                                       network's prediction (no full-resolution flow)
:func:`flownet.prepare_inputs`         ``FlowNetSimple.prepare_inputs`` and ``prepare_image``:
:func:`flownet.prepare_image`          renormalised at half resolution
:func:`onednn.conv_act_forward`        the neck's conv + ReLU: one oneDNN primitive, or
                                       Winograd F(2x2, 3x3) for the DC5 neck's 3x3
:func:`onednn.rpn_forward`             ``RPNHead.forward``: the 3x3 conv by Winograd, the
                                       1x1 convs as oneDNN primitives
:func:`onednn.linear_forward`          the ``nn.Linear`` layers of the RoI head (box head,
                                       SELSA attention): one GEMM on the transposed weight
                                       (MKL), or on oneDNN where MKL is slow (AMD CPUs with
                                       AVX-512: ``onednn.gemm_backend``)
:func:`roi_align.roi_align_forward`    ``SingleRoIExtractor.roi_align`` (and TemporalRoIAlign's):
                                       RoIAlign as bilinear taps gathered with ``embedding_bag``
:func:`troi.temporal_roi_align_forward`  ``TemporalRoIAlign.forward``: re-associated (RoIAlign
                                       taps x a key/reference Gram matrix, tap projections)
:func:`selsa.attention_forward`        ``SelsaAggregator.forward_projected``: fused
                                       scaled-dot-product attention (no weight tensor)
:func:`fgfa.fgfa_aggregate`            ``FGFA.aggregate``: the embedding conv of every warped
                                       map from per-frame tap projections
:func:`nms.head_nms`                   ``RPNHead.nms``, ``RoIHead.nms``: greedy NMS that stops
                                       at the last box used (300 proposals, 100 detections)
=====================================  ===================================================

``tests/test_speedups.py`` proves fast == plain for each of them.
"""
from __future__ import annotations

from torch import nn

from viddet.methods.fgfa import FGFA
from viddet.models.aggregators import SelsaAggregator, TemporalRoIAlign
from viddet.models.backbones import ResNetDC5
from viddet.models.detector import ChannelMapper, RoIHead, RPNHead, SingleRoIExtractor
from viddet.models.flownet import FlowNetSimple
from viddet.models.layers import ConvAct
from viddet.speedups import fgfa, flownet, nms, onednn, roi_align, selsa, troi, winograd  # noqa: F401


class FastMethod:
    """Stands in for the method ``name`` of one module instance: runs ``fast(module, *args)`` and,
    when that returns None (does not apply), the class's plain method."""

    def __init__(self, module: nn.Module, name: str, fast):
        self.module, self.name, self.fast = module, name, fast

    def __call__(self, *args, **kwargs):
        out = self.fast(self.module, *args, **kwargs)
        if out is None:
            out = getattr(type(self.module), self.name)(self.module, *args, **kwargs)
        return out

    def __repr__(self) -> str:
        return f'<fast {type(self.module).__name__}.{self.name}: {self.fast.__module__}.{self.fast.__name__}>'


def _install(module: nn.Module, name: str, fast) -> None:
    module.__dict__[name] = FastMethod(module, name, fast)


def enable(model: nn.Module) -> nn.Module:
    """Installs every fast path that fits a module of ``model`` (see the module docstring) and
    returns ``model``. Idempotent."""
    for m in model.modules():
        if isinstance(m, ResNetDC5):
            _install(m, 'forward', onednn.resnet_forward)
        elif isinstance(m, FlowNetSimple):
            _install(m, 'forward_prepared', flownet.flownet_forward_prepared)
            _install(m, 'forward_features', flownet.flownet_forward_features)
            _install(m, 'prepare_inputs', flownet.prepare_inputs)
            _install(m, 'prepare_image', flownet.prepare_image)
        elif isinstance(m, ChannelMapper):
            for conv in m.modules():
                if isinstance(conv, ConvAct):
                    _install(conv, 'forward', onednn.conv_act_forward)
        elif isinstance(m, RoIHead):
            for layer in m.modules():
                if isinstance(layer, nn.Linear):
                    _install(layer, 'forward', onednn.linear_forward)
        if isinstance(m, SingleRoIExtractor):   # TemporalRoIAlign too: its plain RoIAlign step
            _install(m, 'roi_align', roi_align.roi_align_forward)
        if isinstance(m, TemporalRoIAlign):
            _install(m, 'forward', troi.temporal_roi_align_forward)
        if isinstance(m, SelsaAggregator):
            _install(m, 'forward_projected', selsa.attention_forward)
        if isinstance(m, FGFA):
            _install(m, 'aggregate', fgfa.fgfa_aggregate)
        if isinstance(m, (RPNHead, RoIHead)):
            _install(m, 'nms', nms.head_nms)
        if isinstance(m, RPNHead):
            _install(m, 'forward', onednn.rpn_forward)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Removes every fast path from ``model`` (the plain modules run again) and returns it."""
    for m in model.modules():
        for name in [k for k, v in vars(m).items() if isinstance(v, FastMethod)]:
            del m.__dict__[name]
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether any fast path is installed on ``model``."""
    return any(isinstance(v, FastMethod) for m in model.modules() for v in vars(m).values())


def cpu_kernels() -> dict:
    """The CPU kernels the fast paths choose on this machine, for benchmark records (a time is
    only comparable with one taken on the same choice): ``{'cpu_capability': PyTorch's CPU kernel
    level ('AVX2', 'AVX512', ...), 'gemm': 'mkl' or 'onednn' (:func:`onednn.gemm_backend`,
    ``VIDDET_CPU_GEMM``), 'winograd': whether wide 3x3 convs run by Winograd
    (:func:`winograd.enabled`, ``VIDDET_WINOGRAD``)}``."""
    import torch
    from viddet.speedups import onednn, winograd
    return {'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'gemm': onednn.gemm_backend(),
            'winograd': winograd.enabled()}


__all__ = ['enable', 'disable', 'is_enabled', 'cpu_kernels', 'FastMethod']
