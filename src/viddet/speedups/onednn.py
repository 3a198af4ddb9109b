"""Fused oneDNN CPU inference kernels: convolution + folded BatchNorm + activation (+ residual add)
in one primitive; and the fully connected layers as one GEMM on their transposed weight.

PyTorch's eager CPU path runs a ResNet bottleneck as separate passes over memory (conv, BN, ReLU,
add, ReLU). oneDNN can apply the BN (folded into the conv's weight and bias), the activation and the
residual addition as post-ops of the convolution, which saves those passes: the R-50 DC5 backbone
runs ~25% faster at 1000x600 on a 2-core AVX-512 CPU (benchmarks/RESULTS.md; FlowNet's fast
path, which also packs its weights, is in :mod:`viddet.speedups.flownet`).

The kernels are PyTorch's own (``torch.ops.mkldnn._convolution_pointwise`` and its transposed /
binary variants, what ``torch.compile`` uses on CPU). They are private: :func:`viddet.runtime.cpu_kernels`
probes them once and records whether they run (``CpuKernels.fused``); the fast modules use them
only then (:func:`fused_applies`), for float32 CPU inference (no autograd, eval mode, no autocast),
where the results equal the eager ones up to float rounding: folding BN into the weight changes the
rounding of ``conv(x) * a + b`` to ``conv(x, w * a) + b`` (relative differences ~1e-7).

Folded weights are cached per module (:class:`FusedCache`) and recomputed when any parameter or
buffer changes (in-place updates bump a tensor's version counter: optimizer steps,
``load_state_dict``; ``.to()`` makes new tensors) or the kernel choice does.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from viddet.speedups import winograd
from viddet.speedups.memo import weights_version


def _ops():
    mk = torch.ops.mkldnn
    return mk._convolution_pointwise, mk._convolution_transpose_pointwise


def fused_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused kernels may run the fast module ``module`` on ``x``: the kernels run here
    (``module.kernels.fused``), float32 CPU tensors, eval mode, no gradient recording, no
    autocast."""
    return (module.kernels.fused and not module.training and not torch.is_grad_enabled()
            and x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu'))


class FusedConv:
    """A conv (+ folded BatchNorm) as oneDNN weight, bias and geometry, applied with post-ops.

    Args:
        conv: ``nn.Conv2d`` or ``nn.ConvTranspose2d``.
        bn: optional eval-mode ``nn.BatchNorm2d`` following it (folded in: weight * a, bias * a +
            beta - mean * a with a = gamma / sqrt(var + eps)).
    """

    def __init__(self, conv: nn.Module, bn: Optional[nn.BatchNorm2d] = None):
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else None
        if bn is not None:
            a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias.detach() - bn.running_mean * a
            w = w * a.view(-1, 1, 1, 1)
            b = shift if b is None else b * a + shift
        self.weight = w.contiguous(memory_format=torch.channels_last) if not self.transposed else w.contiguous()
        self.bias = b
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.output_padding = list(getattr(conv, 'output_padding', (0, 0)))

    @classmethod
    def of(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int = 1, padding: int = 0) -> 'FusedConv':
        """A convolution given by its (folded) weight (O, C, kh, kw) and bias (O,) (no dilation or
        groups)."""
        conv = cls.__new__(cls)
        conv.transposed = False
        conv.weight = weight.contiguous(memory_format=torch.channels_last)
        conv.bias = bias
        conv.padding, conv.stride, conv.dilation = [padding] * 2, [stride] * 2, [1, 1]
        conv.groups, conv.output_padding = 1, [0, 0]
        return conv

    def __call__(self, x: torch.Tensor, act: str = 'none', scalars: Sequence[float] = (),
                 add: Optional[torch.Tensor] = None) -> torch.Tensor:
        """conv(x) [+ add] then ``act`` ('none', 'relu', 'leaky_relu' with scalars [slope])."""
        conv, conv_t = _ops()
        if self.transposed:
            if add is not None:
                raise ValueError('residual add is not supported for transposed convs')
            return conv_t(x, self.weight, self.bias, self.padding, self.output_padding, self.stride,
                          self.dilation, self.groups, act, list(scalars), '')
        if add is not None:
            return conv.binary(x, add, self.weight, self.bias, self.padding, self.stride, self.dilation,
                               self.groups, 'add', 1.0, act if act != 'none' else None, list(scalars), '')
        return conv(x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                    act, list(scalars), '')


class FusedCache:
    """Per-module cache of :class:`FusedConv` objects, rebuilt when the module's tensors or its
    kernel choice (``module.kernels``) change."""

    def __init__(self):
        self._key: Optional[Tuple] = None
        self._convs: Dict[str, FusedConv] = {}

    def get(self, module: nn.Module, build) -> Dict[str, FusedConv]:
        """``build(module) -> {name: FusedConv}``, cached until a parameter/buffer or the kernel
        choice changes."""
        key = (weights_version(module), module.kernels)
        if key != self._key:
            self._convs = build(module)
            self._key = key
        return self._convs


def conv_act_spec(act: Optional[nn.Module]) -> Tuple[str, List[float]]:
    """oneDNN post-op name and scalars of an activation module (None, ReLU, LeakyReLU)."""
    if act is None:
        return 'none', []
    if isinstance(act, nn.LeakyReLU):
        return 'leaky_relu', [float(act.negative_slope)]
    if isinstance(act, nn.ReLU):
        return 'relu', []
    raise ValueError(f'no fused post-op for {type(act).__name__}')



def fused_or_winograd(conv: nn.Module, bn: Optional[nn.BatchNorm2d] = None, use_winograd: bool = False):
    """``conv`` (+ folded ``bn``) as a :class:`FusedConv`, and with ``use_winograd`` where Winograd
    applies (wide 3x3 stride-1 convolutions: :func:`viddet.speedups.winograd.applies`) as a
    :class:`viddet.speedups.winograd.WinogradConv` for inputs of enough tiles
    (:class:`viddet.speedups.winograd.OrDirect`); called as ``f(x, act, scalars)``."""
    fused = FusedConv(conv, bn)
    if use_winograd and winograd.applies(conv):
        return winograd.OrDirect(winograd.WinogradConv(fused.weight, fused.bias, conv.dilation[0]), fused)
    return fused


def matmul_nt(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
              gemm: str = 'mkl') -> torch.Tensor:
    """``x @ w.T (+ bias)`` for x (M, K), w (N, K), bias (N,) -> (M, N); with ``gemm='onednn'``
    (:attr:`viddet.runtime.CpuKernels.gemm`) by oneDNN's inner product for float32 CPU inference
    (no autograd, no autocast), else by ``torch.mm`` (PyTorch's BLAS)."""
    if (gemm == 'onednn' and not torch.is_grad_enabled()
            and x.device.type == 'cpu' and x.dtype == w.dtype == torch.float32 and x.dim() == 2
            and x.shape[0] > 0 and not torch.is_autocast_enabled('cpu')):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), bias, 'none', [], '')
    return torch.addmm(bias, x, w.t()) if bias is not None else x.mm(w.t())


def conv1x1_rows(x: torch.Tensor, weight: torch.Tensor, gemm: str = 'mkl') -> torch.Tensor:
    """``rows(x) @ weight.T`` for x (1, C, H, W), weight (O, C): (H*W, O), row = y*W + x.

    One GEMM (:func:`matmul_nt` by ``gemm``) on the location-major rows of ``x`` (a copy unless ``x`` is
    channels-last); float32 also under autocast (the gathers that use it need one dtype). (PyTorch
    runs a 1x1 ``conv2d`` of a batch under 16 at one thread as im2col + BLAS GEMM, not on oneDNN.)
    """
    with torch.autocast(x.device.type, enabled=False):
        rows = x.float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return matmul_nt(rows, weight.float(), gemm=gemm)
