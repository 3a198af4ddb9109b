"""Fast paths: faster ways to compute exactly what the plain modules compute, for inference.

The modules in :mod:`viddet.models` and :mod:`viddet.methods` are the readable reference
implementation of the papers (and what training uses). This package holds an equivalent *fast
module* for each of them that can be computed faster, each in the file of its idea, and swaps them
into a model with one call::

    model = speedups.convert(model, kernels)   # what viddet's inference does by default
    model = speedups.revert(model)             # the plain modules again (export, FLOP counting, debugging)

(or ``VideoDetector.from_checkpoint(..., fast=False)``, ``--set test.fast=false`` on the command
line). A fast module ``FastX`` is a subclass of the plain module ``X`` (so ``isinstance`` checks
hold), built from the plain instance with its parameters, buffers and submodules (the same
tensors: the state dict keys and values do not change, checkpoints load unchanged); it overrides
the methods it speeds up and calls the plain ones (``super()``) wherever the fast computation does
not apply (autograd on, another device or dtype, a configuration it does not cover). Its caches are
ordinary attributes. The protocol is :class:`viddet.models.fast.FastModule`'s:

* ``FastX(plain, kernels)`` builds the fast module from a plain ``X`` instance (which is left as it
  was); ``kernels`` is the CPU kernel choice (:class:`viddet.runtime.CpuKernels`, decided by
  :func:`viddet.runtime.cpu_kernels` from the CPU and ``VIDDET_CPU_GEMM`` / ``VIDDET_WINOGRAD``),
  kept as ``fast.kernels``;
* ``fast.to_plain()`` gives back the plain ``X`` (without the fast module's ``fast_attributes``).

:func:`convert` swaps in the fast module of every module whose exact type is in
:data:`FAST_MODULES` (or, inside a module of a :data:`FAST_MODULES_INSIDE` type, in its table),
plus those the model's method declares: a VID method with a module of its own declares its fast
version in its own file, ``fast_modules = {PlainModule: FastModule}``
(:attr:`viddet.methods.base.VIDMethod.fast_modules`, written against :mod:`viddet.models.fast`
without importing this package), and those the caller passes (``convert(model, kernels,
fast_modules)``: an ONNX export's stand-ins, :mod:`viddet.export.stages`). :func:`revert` swaps
every fast module back.

==========================================  ==================================================
fast module                                 speeds up
==========================================  ==================================================
:class:`detector.FastResNetDC5`             ``ResNetDC5.forward``: BN folded into the convs, ReLU
                                            and residual add as oneDNN post-ops, channels-last;
                                            wide 3x3 convs by Winograd F(2x2, 3x3) (:mod:`winograd`)
:class:`flownet.FastFlowNetSimple`          ``forward_prepared``, ``forward_features``: packed oneDNN
                                            weights, sub-pixel transposed convs, tap-sum flow convs,
                                            the flow resized to the feature grid from the
                                            prediction; ``prepare_inputs``, ``prepare_image``:
                                            renormalised at half resolution
:class:`detector.FastConvAct`               the neck's conv + ReLU (in ``ChannelMapper``): one
                                            oneDNN primitive, or Winograd for the DC5 neck's 3x3
:class:`detector.FastRPNHead`               ``RPNHead.forward``: the 3x3 conv by Winograd, the 1x1
                                            convs as oneDNN primitives; ``nms`` as below
:class:`detector.FastLinear`                the ``nn.Linear`` layers of the RoI head (box head,
                                            SELSA attention): one GEMM on the transposed weight
                                            (MKL), or on oneDNN where MKL is slow (``kernels.gemm``)
:class:`detector.FastSingleRoIExtractor`    ``roi_align``: RoIAlign as bilinear taps gathered with
                                            ``embedding_bag`` (:mod:`roi_align`)
:class:`troi.FastTemporalRoIAlign`          ``TemporalRoIAlign.forward``: re-associated (RoIAlign
                                            taps x a key/reference Gram matrix, tap projections)
:class:`selsa.FastSelsaAggregator`          ``SelsaAggregator.forward_projected``: fused
                                            scaled-dot-product attention (no weight tensor)
:class:`fgfa.FastEmbedAggregator`           ``EmbedAggregator.aggregate_window`` (FGFA): the
                                            embedding conv of every warped map from per-frame tap
                                            projections
:class:`detector.FastRPNHead`,              ``nms``: greedy NMS that stops at the last box used
:class:`detector.FastRoIHead`               (300 proposals, 100 detections; :mod:`nms`)
:class:`yolox.FastBaseConv`                 YOLOX's conv + BN + SiLU (CSPDarknet, PAFPN, head):
                                            one oneDNN primitive, BN folded, SiLU as the swish
                                            post-op, channels-last; the >= 128-channel 3x3 ones
                                            by Winograd F(4x4, 3x3) where ``kernels.winograd4``
                                            (:mod:`winograd4`)
:class:`cspdarknet.FastCSPDarknet`          stem and dark2..dark4 on the frames' part of the
                                            letterbox only, the grey rest of each map from a
                                            blank canvas's maps (made once per input size)
:class:`cspdarknet.FastFocus`               the stem: one 6x6 stride-2 conv of the image
:class:`cspdarknet.FastSPPBottleneck`       SPP's 5/9/13 max pools as a cascade of row and
                                            column pools
:class:`cspdarknet.FastPAFPN`               backbone + neck a few frames at a time
:class:`yolox.FastYOLOVHead`,               ``cls2_at``: the ``cls_convs2`` features of the
:class:`yolox.FastYOLOVPPHead`              candidates only (gathered 3x3 patches x folded
                                            weights); YOLOV's ``still_parts``: the class tower
                                            at each frame's top-``pre`` anchors by objectness
==========================================  ==================================================

``tests/test_speedups.py`` proves fast == plain for each of them.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

from torch import nn

from viddet.methods.base import VIDMethod
from viddet.models.aggregators import EmbedAggregator, SelsaAggregator
from viddet.models.backbones import ResNetDC5
from viddet.models.detector import ChannelMapper, RoIHead, RPNHead, SingleRoIExtractor
from viddet.models.fast import FastModule
from viddet.models.flownet import FlowNetSimple
from viddet.models.layers import ConvAct
from viddet.models.temporal_roi_align import TemporalRoIAlign
from viddet.models.yolov_head import YOLOVHead, YOLOVPPHead
from viddet.models.yolox import PAFPN, BaseConv, CSPDarknet, Focus, SPPBottleneck
from viddet.runtime import CpuKernels, cpu_kernels
from viddet.speedups.detector import (FastConvAct, FastLinear, FastResNetDC5, FastRoIHead, FastRPNHead,
                                      FastSingleRoIExtractor)
from viddet.speedups.fgfa import FastEmbedAggregator
from viddet.speedups.flownet import FastFlowNetSimple
from viddet.speedups.selsa import FastSelsaAggregator
from viddet.speedups.troi import FastTemporalRoIAlign
from viddet.speedups.cspdarknet import FastCSPDarknet, FastFocus, FastPAFPN, FastSPPBottleneck
from viddet.speedups.yolox import FastBaseConv, FastYOLOVHead, FastYOLOVPPHead

FAST_MODULES: Dict[type, type] = {
    ResNetDC5: FastResNetDC5,
    FlowNetSimple: FastFlowNetSimple,
    RPNHead: FastRPNHead,
    RoIHead: FastRoIHead,
    SingleRoIExtractor: FastSingleRoIExtractor,
    TemporalRoIAlign: FastTemporalRoIAlign,
    SelsaAggregator: FastSelsaAggregator,
    EmbedAggregator: FastEmbedAggregator,
    BaseConv: FastBaseConv,
    CSPDarknet: FastCSPDarknet,
    Focus: FastFocus,
    SPPBottleneck: FastSPPBottleneck,
    PAFPN: FastPAFPN,
    YOLOVHead: FastYOLOVHead,
    YOLOVPPHead: FastYOLOVPPHead,
}
"""Plain module type -> its fast module, wherever it is in a model (exact types: a subclass of a
plain module needs an entry of its own)."""

FAST_MODULES_INSIDE: Dict[type, Dict[type, type]] = {
    ChannelMapper: {ConvAct: FastConvAct},     # the neck's convs (not FlowNet's or an aggregator's)
    RoIHead: {nn.Linear: FastLinear},          # the box head's and SELSA's fully connected layers
}
"""Container type -> {plain type: fast module} for modules inside a container of that type."""


def convert(model: nn.Module, kernels: Optional[CpuKernels] = None,
            fast_modules: Optional[Mapping[type, type]] = None) -> nn.Module:
    """Swaps every fast module that fits into ``model`` (module docstring) and returns the model.

    The swap is in place (the parent's child is replaced) except for ``model`` itself when it is a
    plain module of the table: then the fast module is returned, so use the result. Fast modules
    already in the model take ``kernels`` (a second call with other kernels switches them, keeping
    their caches); so ``convert`` is idempotent. The state dict is unchanged.

    Args:
        model: a VID method (its ``fast_modules`` are swapped in too) or any module.
        kernels: the CPU kernels to run; None: :func:`viddet.runtime.cpu_kernels` (the CPU, and the
            ``VIDDET_CPU_GEMM`` / ``VIDDET_WINOGRAD`` settings).
        fast_modules: ``{plain module class: fast module class}`` for module types of a layer above
            this package, as a method's ``fast_modules`` (the ONNX Runtime stand-ins of an export,
            :data:`viddet.export.stages.FAST_STAND_INS`).

    Raises:
        VidDetError: ``kernels`` None and an invalid ``VIDDET_*`` setting.
    """
    kernels = cpu_kernels() if kernels is None else kernels
    table = {**FAST_MODULES, **(model.fast_modules if isinstance(model, VIDMethod) else {}), **(fast_modules or {})}
    return _convert(model, table, kernels)


def _convert(module: nn.Module, table: Dict[type, type], kernels: CpuKernels) -> nn.Module:
    if isinstance(module, FastModule):
        module.kernels = kernels
    elif type(module) in table:
        module = table[type(module)](module, kernels)
    inside = {k: v for container, t in FAST_MODULES_INSIDE.items() if isinstance(module, container)
              for k, v in t.items()}
    for name, child in list(module.named_children()):
        fast = _convert(child, {**table, **inside}, kernels)
        if fast is not child:
            module.add_module(name, fast)
    return module


def revert(model: nn.Module) -> nn.Module:
    """Swaps every fast module of ``model`` back to its plain module (:meth:`FastModule.to_plain`)
    and returns the model (a new object when ``model`` itself is a fast module). The state dict is
    unchanged."""
    if isinstance(model, FastModule):
        model = model.to_plain()
    for name, child in list(model.named_children()):
        plain = revert(child)
        if plain is not child:
            model.add_module(name, plain)
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` holds any fast module."""
    return any(isinstance(m, FastModule) for m in model.modules())


def kernels_of(model: nn.Module) -> Optional[CpuKernels]:
    """The CPU kernels the fast modules of ``model`` run (what :func:`convert` was given), or None
    when it holds none (the plain modules run)."""
    return next((m.kernels for m in model.modules() if isinstance(m, FastModule)), None)


def describe(model: nn.Module) -> str:
    """One line for the records of a run: ``'fast paths, CPU kernels: AVX2, GEMM on mkl, ...'`` or
    ``'plain modules'``."""
    kernels = kernels_of(model)
    return 'plain modules (no fast paths)' if kernels is None else f'fast paths, CPU kernels: {kernels}'


__all__ = ['convert', 'revert', 'is_converted', 'kernels_of', 'describe', 'FAST_MODULES', 'FAST_MODULES_INSIDE']
