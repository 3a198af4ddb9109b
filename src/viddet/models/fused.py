"""Fused CPU inference kernels: convolution + folded BatchNorm + activation (+ residual add) in one
oneDNN primitive.

PyTorch's eager CPU path runs a ResNet bottleneck as separate passes over memory (conv, BN, ReLU,
add, ReLU). oneDNN can apply the BN (folded into the conv's weight and bias), the activation and the
residual addition as post-ops of the convolution, which saves those passes: the R-50 DC5 backbone
runs ~25% faster at 1000x600 on a 2-core AVX-512 CPU, FlowNet ~7% (benchmarks/RESULTS.md).

The kernels are PyTorch's own (``torch.ops.mkldnn._convolution_pointwise`` and its transposed /
binary variants, what ``torch.compile`` uses on CPU). They are private, so every use is guarded:
:func:`fast_path` is False when they are missing or fail once, and the callers then run their plain
modules. They apply only to float32 CPU inference (no autograd, eval mode, no autocast), where the
results equal the eager ones up to float rounding: folding BN into the weight changes the rounding
of ``conv(x) * a + b`` to ``conv(x, w * a) + b`` (relative differences ~1e-7).

Folded weights are cached per module and recomputed when any parameter or buffer changes (in-place
updates bump a tensor's version counter: optimizer steps, ``load_state_dict``; ``.to()`` makes new
tensors).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

_STATE = {'ok': None}  # None: untested, True/False after the first attempt


def _ops():
    mk = getattr(torch.ops, 'mkldnn', None)
    return (getattr(mk, '_convolution_pointwise', None), getattr(mk, '_convolution_transpose_pointwise', None))


def fast_path(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused kernels may run ``module`` on ``x``: float32 CPU tensors, eval mode, no
    gradient recording, no autocast, and the kernels available (and not failed before)."""
    if _STATE['ok'] is False or module.training or torch.is_grad_enabled():
        return False
    if x.device.type != 'cpu' or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    if torch.is_autocast_enabled('cpu'):
        return False
    return all(op is not None for op in _ops())


def disable(reason: Exception) -> None:
    """Turns the fused path off for the rest of the process (after an unexpected failure)."""
    import warnings
    _STATE['ok'] = False
    warnings.warn(f'viddet: fused oneDNN kernels unavailable ({type(reason).__name__}: {reason}); '
                  'using the plain PyTorch modules', RuntimeWarning, stacklevel=3)


def _key(module: nn.Module) -> Tuple:
    return tuple((id(t), t._version) for t in list(module.parameters()) + list(module.buffers()))


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
    """Per-module cache of :class:`FusedConv` objects, rebuilt when the module's tensors change."""

    def __init__(self):
        self._key: Optional[Tuple] = None
        self._convs: Dict[str, FusedConv] = {}

    def get(self, module: nn.Module, build) -> Dict[str, FusedConv]:
        """``build(module) -> {name: FusedConv}``, cached until a parameter/buffer changes."""
        key = _key(module)
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


__all__ = ['fast_path', 'disable', 'FusedConv', 'FusedCache', 'conv_act_spec', 'linear']


def linear(layer: nn.Linear, x: torch.Tensor, act: str = 'none') -> torch.Tensor:
    """``layer(x)`` (then ReLU when ``act == 'relu'``) for 2-D ``x``; on the fused path through
    oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``), about twice the fp32
    throughput of the default GEMM on AMD CPUs (same values up to summation order)."""
    if x.dim() == 2 and fast_path(layer, x):
        op = getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise', None)
        if op is not None:
            try:
                return op(x, layer.weight, layer.bias, act, [], '')
            except RuntimeError as e:
                disable(e)
    y = nn.functional.linear(x, layer.weight, layer.bias)
    return nn.functional.relu(y) if act == 'relu' else y
