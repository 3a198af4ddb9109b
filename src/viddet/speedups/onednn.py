"""Fused oneDNN CPU inference kernels: convolution + folded BatchNorm + activation (+ residual add)
in one primitive; and the fully connected layers as one GEMM on their transposed weight.

PyTorch's eager CPU path runs a ResNet bottleneck as separate passes over memory (conv, BN, ReLU,
add, ReLU). oneDNN can apply the BN (folded into the conv's weight and bias), the activation and the
residual addition as post-ops of the convolution, which saves those passes: the R-50 DC5 backbone
runs ~25% faster at 1000x600 on a 2-core AVX-512 CPU (benchmarks/RESULTS.md; FlowNet's fast
path, which also packs its weights, is in :mod:`viddet.speedups.flownet`).

The kernels are PyTorch's own (``torch.ops.mkldnn._convolution_pointwise`` and its transposed /
binary variants, what ``torch.compile`` uses on CPU). They are private, so every use is guarded:
:func:`fast_path` is False when they are missing or fail once, and the plain modules run instead.
They apply only to float32 CPU inference (no autograd, eval mode, no autocast), where the results
equal the eager ones up to float rounding: folding BN into the weight changes the rounding
of ``conv(x) * a + b`` to ``conv(x, w * a) + b`` (relative differences ~1e-7).

Folded weights are cached per module and recomputed when any parameter or buffer changes (in-place
updates bump a tensor's version counter: optimizer steps, ``load_state_dict``; ``.to()`` makes new
tensors).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from viddet.speedups import winograd
from viddet.speedups.memo import weights_version

_BROKEN = []  # holds the first failure of the private kernels; they are not tried again after it
_OFF = []     # non-empty inside ``kernels_off()``


def _ops():
    mk = getattr(torch.ops, 'mkldnn', None)
    return (getattr(mk, '_convolution_pointwise', None), getattr(mk, '_convolution_transpose_pointwise', None))


def fast_path(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused kernels may run ``module`` on ``x``: float32 CPU tensors, eval mode, no
    gradient recording, no autocast, and the kernels available (and not failed before)."""
    if _BROKEN or _OFF or module.training or torch.is_grad_enabled():
        return False
    if x.device.type != 'cpu' or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    if torch.is_autocast_enabled('cpu'):
        return False
    return all(op is not None for op in _ops())


@contextlib.contextmanager
def kernels_off():
    """Within the block the fused kernels of this module (and the transposed-weight GEMM) step
    aside and the plain layers run, while the other fast paths stay on: for counting a fast
    model's FLOPs with ``torch.utils.flop_counter`` (which knows the plain aten ops only)."""
    _OFF.append(True)
    try:
        yield
    finally:
        _OFF.pop()


def give_up(reason: Exception) -> None:
    """Stops using the fused kernels for the rest of the process (after an unexpected failure)."""
    import warnings
    _BROKEN.append(reason)
    warnings.warn(f'viddet: fused oneDNN kernels unavailable ({type(reason).__name__}: {reason}); '
                  'using the plain PyTorch modules', RuntimeWarning, stacklevel=3)


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
        key = weights_version(module)
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




# ---------------------------------------------------------------------------------- fast forwards
# Each takes the module and the plain forward's arguments and returns None where it does not apply
# (viddet.speedups then runs the plain forward). A failure of the private kernels turns them off
# for the process (give_up) instead of failing the run.

def linear_forward(layer: nn.Linear, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``layer(x)`` for 2-D float32 CPU ``x`` as one GEMM (:func:`matmul_nt`); with MKL against the
    weight stored transposed (in x out, cached per weight version): the GEMM then reads the weight
    in its natural row-major order. For the box head's 25088 -> 1024 fc on 300 RoIs at one thread
    this is 129 ms against 146 ms (``F.linear``) and 141 ms (oneDNN's inner product) on an Intel
    AVX-512 Xeon, 387 / 763 / 499 ms with AVX2 only; on an AMD AVX-512 EPYC (Zen 5) oneDNN's 77 ms
    against MKL's 162 (:func:`gemm_backend`). Same values up to summation order."""
    if x.dim() != 2 or not fast_path(layer, x):
        return None
    if gemm_backend() == 'onednn':
        return matmul_nt(x, layer.weight, layer.bias)
    cache = layer.__dict__.setdefault('_fused', FusedCache())
    wt = cache.get(layer, lambda m: {'wt': m.weight.detach().t().contiguous()})['wt']
    return torch.addmm(layer.bias, x, wt) if layer.bias is not None else x.mm(wt)


def fused_or_winograd(conv: nn.Module, bn: Optional[nn.BatchNorm2d] = None):
    """``conv`` (+ folded ``bn``) as a :class:`FusedConv`, and where Winograd applies (wide 3x3
    stride-1 convolutions: :func:`viddet.speedups.winograd.applies`) as a
    :class:`viddet.speedups.winograd.WinogradConv` for inputs of enough tiles
    (:class:`viddet.speedups.winograd.OrDirect`); called as ``f(x, act, scalars)``."""
    fused = FusedConv(conv, bn)
    if winograd.applies(conv):
        return winograd.OrDirect(winograd.WinogradConv(fused.weight, fused.bias, conv.dilation[0]), fused)
    return fused


def rpn_forward(head: nn.Module, x: torch.Tensor):
    """``RPNHead.forward``: its 3x3 conv + ReLU by :func:`fused_or_winograd` (Winograd for the
    512-channel head), the two 1x1 convs as oneDNN primitives; None where the fast path does not
    apply."""
    if not fast_path(head, x):
        return None
    f = head.__dict__.setdefault('_fused', FusedCache()).get(head, lambda m: {
        'conv': fused_or_winograd(m.rpn_conv), 'cls': FusedConv(m.rpn_cls), 'reg': FusedConv(m.rpn_reg)})
    try:
        x = f['conv'](x, 'relu')
        return f['cls'](x), f['reg'](x)
    except RuntimeError as e:
        give_up(e)
        return None


def conv_act_forward(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A :class:`viddet.models.layers.ConvAct` (the neck's conv + ReLU) as one fused conv +
    activation primitive, or by Winograd's F(2x2, 3x3) where that applies (the DC5 neck's 3x3
    2048 -> 512: :func:`fused_or_winograd`); None (the plain module runs) where the fast path does
    not apply."""
    if not fast_path(module, x):
        return None
    cache = module.__dict__.setdefault('_fused', FusedCache())
    conv = cache.get(module, lambda m: {'conv': fused_or_winograd(m.conv)})['conv']
    act, scalars = conv_act_spec(module.act)
    try:
        return conv(x, act, scalars)
    except RuntimeError as e:
        give_up(e)
        return None


def resnet_forward(backbone: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """:class:`viddet.models.backbones.ResNetDC5` with each conv's BN folded in and ReLU / residual
    add as post-ops, in channels-last memory format (~25% faster backbone at 1000x600; oneDNN's
    convolutions are ~30% faster on NHWC than on NCHW), and the wide stride-1 3x3 convolutions
    (layers 2-4) by Winograd's F(2x2, 3x3) (:func:`fused_or_winograd`); same values up to
    rounding."""
    if not fast_path(backbone, x):
        return None
    from viddet.models.backbones import Bottleneck

    def build(m):
        convs = {'stem': FusedConv(m.conv1, m.bn1)}
        for name, blk in m.named_modules():
            if isinstance(blk, Bottleneck):
                convs[name + '.1'] = FusedConv(blk.conv1, blk.bn1)
                convs[name + '.2'] = fused_or_winograd(blk.conv2, blk.bn2)
                convs[name + '.3'] = FusedConv(blk.conv3, blk.bn3)
                if blk.downsample is not None:
                    convs[name + '.ds'] = FusedConv(blk.downsample[0], blk.downsample[1])
        return convs
    try:
        f = backbone.__dict__.setdefault('_fused', FusedCache()).get(backbone, build)
        x = x.contiguous(memory_format=torch.channels_last)
        x = backbone.maxpool(f['stem'](x, 'relu'))
        for i in range(1, 5):
            for j in range(len(getattr(backbone, f'layer{i}'))):
                name = f'layer{i}.{j}'
                identity = f[name + '.ds'](x) if name + '.ds' in f else x
                out = f[name + '.2'](f[name + '.1'](x, 'relu'), 'relu')
                x = f[name + '.3'](out, 'relu', add=identity)
        return x
    except RuntimeError as e:
        give_up(e)
        return None


def _cpu_vendor() -> str:
    """The CPU's vendor string on Linux (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('vendor_id'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor()


@functools.lru_cache(maxsize=None)
def gemm_backend() -> str:
    """Which library runs viddet's large float32 CPU matrix products at inference: ``'mkl'``
    (``torch.mm``, PyTorch's BLAS) or ``'onednn'`` (oneDNN's inner product,
    ``torch.ops.mkldnn._linear_pointwise``).

    PyTorch's x86 wheels do their fp32 GEMMs with MKL, which runs AVX-512 kernels on Intel CPUs
    only: on an AMD CPU with AVX-512 (Zen 4, Zen 5) it takes its AVX2 kernels, and oneDNN, which
    dispatches by instruction set, is ~2.1x faster (measured on a 2-core AMD EPYC Zen 5, 1 and 2
    threads, every GEMM shape of the detectors: 300x25088x1024 94 vs 199 GFLOP/s at one thread;
    ``benchmarks/RESULTS.md``). On Intel CPUs MKL is as fast or faster (129 vs 141 ms for the box
    head's fc6 on AVX-512, 387 vs 499 ms on AVX2), so this is ``'onednn'`` exactly for AMD CPUs
    with AVX-512, unless the environment variable ``VIDDET_CPU_GEMM`` says ``mkl`` or ``onednn``.
    Both give the same values up to float summation order.
    """
    choice = os.environ.get('VIDDET_CPU_GEMM', '').strip().lower()
    if choice in ('mkl', 'onednn'):
        return choice
    if getattr(torch.ops.mkldnn, '_linear_pointwise', None) is None or not torch.backends.mkldnn.is_available():
        return 'mkl'
    amd = 'amd' in _cpu_vendor().lower()
    return 'onednn' if amd and torch.backends.cpu.get_cpu_capability().startswith('AVX512') else 'mkl'


def matmul_nt(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for x (M, K), w (N, K), bias (N,) -> (M, N), with the library of
    :func:`gemm_backend` for float32 CPU inference (no autograd), ``torch.mm`` otherwise (also
    inside :func:`kernels_off`, so that the FLOP counter sees it)."""
    if (gemm_backend() == 'onednn' and not _BROKEN and not _OFF and not torch.is_grad_enabled()
            and x.device.type == 'cpu' and x.dtype == w.dtype == torch.float32 and x.dim() == 2
            and x.shape[0] > 0 and not torch.is_autocast_enabled('cpu')):
        try:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), bias, 'none', [], '')
        except RuntimeError as e:
            give_up(e)
    return torch.addmm(bias, x, w.t()) if bias is not None else x.mm(w.t())


def conv1x1_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows(x) @ weight.T`` for x (1, C, H, W), weight (O, C): (H*W, O), row = y*W + x.

    One GEMM (:func:`matmul_nt`) on the location-major rows of ``x`` (a copy unless ``x`` is
    channels-last); float32 also under autocast (the gathers that use it need one dtype). (PyTorch
    runs a 1x1 ``conv2d`` of a batch under 16 at one thread as im2col + BLAS GEMM, not on oneDNN.)
    """
    with torch.autocast(x.device.type, enabled=False):
        rows = x.float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return matmul_nt(rows, weight.float())
