"""FlowNetSimple for CPU inference: the same values as the plain module up to float rounding,
faster per image pair at the DFF size (numbers in benchmarks/RESULTS.md).

* **Packed weights.** oneDNN computes with weights in a blocked layout and reorders a plain
  weight tensor on every call. For FlowNet's deep layers, whose weights (up to 38 MB for
  ``conv6.1``, 34 MB for ``deconv5``) outweigh their few pixels, the reorder cost more than the
  convolution, and more so for the transposed convolutions. Here every weight is reordered once
  per input shape and oneDNN layout (:class:`PackedConv`, as ``torch.compile`` packs constant
  weights) and kept per weight version (:class:`viddet.speedups.onednn.FusedCache`). With packed
  weights oneDNN's transposed convs are as fast as their sub-pixel decomposition (one 2x2 conv
  with 4x the output channels, interleaved: measured equal with AVX-512, slower with AVX2).
* **Two-channel flow predictions** (3x3 convs C -> 2, which oneDNN runs at ~1/8 of its
  throughput): a 1x1 conv C -> 18 (one output pair per kernel tap) and a sum of the 9 shifted taps
  (:class:`TapConv`).
* **Fewer passes over memory**: the decoder's concatenations (with MMTracking's ``crop_like``)
  are written in place in channels-last layout, the flow's scale (x8 x5) is applied before its x8
  upsampling (on 1/64 of the values), and :meth:`FastFlowNetSimple.prepare_inputs` renormalises
  the 2x2 block means of the detector-normalised images (FlowNet's renormalisation is per-channel
  affine) instead of the full-resolution images.
* **Winograd F(2x2, 3x3)** for the encoder's stride-1 3x3 convs where ``kernels.winograd``
  (:mod:`viddet.speedups.winograd`).

:class:`FastFlowNetSimple` runs them; each of its methods runs the plain one where its fast path
does not apply.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from viddet.models.fast import FastModule
from viddet.models.flownet import FlowNetSimple
from viddet.models.warp import resize_flow
from viddet.runtime import CpuKernels
from viddet.speedups import winograd
from viddet.speedups.onednn import FusedCache, conv_act_spec, fused_applies

__all__ = ['FastFlowNetSimple', 'PackedConv', 'TransposedDeconv', 'TapConv']


def _layout(packed: torch.Tensor) -> Optional[bytes]:
    """oneDNN's serialized memory descriptor of a packed weight (its blocked layout), or None
    where this PyTorch lacks the op."""
    op = getattr(torch.ops.mkldnn, '_get_mkldnn_serialized_md', None)
    return None if op is None else op(packed).numpy().tobytes()


class PackedConv:
    """A 2-D convolution or transposed convolution with symmetric padding (+ bias, + activation
    post-op) as one oneDNN primitive with its weight reordered into oneDNN's layout once per
    input shape (``torch.ops.mkldnn._reorder_convolution_weight``, as ``torch.compile`` packs
    constant weights on CPU). The layout depends on the ISA and the problem (e.g. the batch size
    with AVX2): shapes that get the same layout share one packed copy, and at most 8 shapes are
    remembered.

    Args:
        weight: (O, I, kh, kw) float32 (``nn.Conv2d`` layout) or, with ``transposed``, (I, O, kh,
            kw) (``nn.ConvTranspose2d`` layout); bias: (O,) or None.
        padding, stride: (y, x) in pixels.
        act, scalars: oneDNN post-op ('none', 'relu', 'leaky_relu' with [slope]).

    Call: (N, I, H, W) channels-last -> (N, O, H', W') channels-last, as ``F.conv2d`` (or
    ``F.conv_transpose2d``) then the activation.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int],
                 stride: Sequence[int] = (1, 1), act: str = 'none', scalars: Sequence[float] = (),
                 transposed: bool = False):
        self.weight = weight.detach().contiguous()
        self.bias = bias.detach().contiguous() if bias is not None else None
        self.padding, self.stride = list(padding), list(stride)
        self.act, self.scalars = act, list(scalars)
        self.transposed = transposed
        self.out_channels = self.weight.shape[1 if transposed else 0]
        self._by_shape: Dict[Tuple[int, ...], torch.Tensor] = {}
        self._by_layout: Dict[bytes, torch.Tensor] = {}

    @classmethod
    def of(cls, module: nn.Module) -> 'PackedConv':
        """From a :class:`viddet.models.layers.ConvAct` (no dilation, no groups)."""
        conv = module.conv
        act, scalars = conv_act_spec(module.act)
        return cls(conv.weight, conv.bias, conv.padding, conv.stride, act, scalars,
                   transposed=isinstance(conv, nn.ConvTranspose2d))

    def packed(self, shape: Tuple[int, ...]) -> torch.Tensor:
        """The weight in oneDNN's layout for an input of ``shape`` (N, I, H, W)."""
        w = self._by_shape.get(shape)
        if w is None:
            mk = torch.ops.mkldnn
            if self.transposed:
                w = mk._reorder_convolution_transpose_weight(self.weight, self.padding, [0, 0],
                                                             self.stride, [1, 1], 1, list(shape))
            else:
                w = mk._reorder_convolution_weight(self.weight, self.padding, self.stride, [1, 1],
                                                   1, list(shape))
            if len(self._by_shape) >= 8:
                self._by_shape.clear()
                self._by_layout.clear()
            layout = _layout(w)
            if layout is not None:
                w = self._by_layout.setdefault(layout, w)
            self._by_shape[shape] = w
        return w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.packed(tuple(x.shape))
        if self.transposed:
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, w, self.bias, self.padding, [0, 0], self.stride, [1, 1], 1, self.act,
                self.scalars, '')
        return torch.ops.mkldnn._convolution_pointwise(x, w, self.bias, self.padding, self.stride,
                                                       [1, 1], 1, self.act, self.scalars, '')


class TransposedDeconv:
    """A :class:`viddet.models.layers.ConvAct` holding a transposed conv (+ its activation) as a
    packed oneDNN primitive; :meth:`into` writes its output, cropped to the top-left window of
    the destination (MMTracking ``crop_like``), into a slice of a concatenation."""

    def __init__(self, module: nn.Module):
        self.conv = PackedConv.of(module)
        self.out_channels = self.conv.out_channels

    def into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:] = crop(module(x))``: x (N, I, H, W) channels-last, out an (N, Ho, Wo, O)
        NHWC view no larger than the module's output."""
        out.copy_(self.conv(x).permute(0, 2, 3, 1)[:, :out.shape[1], :out.shape[2]])


class TapConv:
    """A 3x3 convolution (stride 1, padding 1, no bias, no activation) with few output channels
    as a 1x1 conv to 9x the channels (one group per kernel tap) and a sum of the 9 shifted taps:
    ``out[p] = sum_{dy, dx} (W[:, :, dy, dx] @ x)[p + (dy - 1, dx - 1)]``, zero outside the map.

    Call: (N, I, H, W) channels-last -> (N, O, H, W) contiguous."""

    def __init__(self, module: nn.Module):
        w = module.conv.weight.detach()
        if w.shape[2:] != (3, 3) or module.conv.bias is not None or module.act is not None:
            raise ValueError('TapConv needs a 3x3 conv without bias and activation')
        self.out_channels = w.shape[0]
        self.conv = PackedConv(w.permute(2, 3, 0, 1).reshape(9 * w.shape[0], w.shape[1], 1, 1),
                               None, (0, 0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        o = self.out_channels
        taps = self.conv(x).permute(0, 2, 3, 1)          # (N, H, W, 9*O)
        out = taps[..., 4 * o:5 * o].clone()             # the centre tap
        for k in (0, 1, 2, 3, 5, 6, 7, 8):
            dy, dx = k // 3 - 1, k % 3 - 1
            out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] += \
                taps[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx), k * o:(k + 1) * o]
        return out.permute(0, 3, 1, 2).contiguous()


class _Plan:
    """FlowNetSimple's layers as packed oneDNN primitives (built per weight version and kernel
    choice). Holds oneDNN tensors that cannot be copied: a deep copy of a model gets an empty plan."""

    def __init__(self, net: nn.Module):
        self.encoder: List[List] = [
            [_encoder_conv(m, net.kernels.winograd) for m in group]
            for group in (net.conv1, net.conv2, net.conv3, net.conv4, net.conv5, net.conv6)]
        self.levels = [(level, TapConv(getattr(net, f'predict_flow{level + 1}')),
                        TransposedDeconv(getattr(net, f'upsample_flow{level}')),
                        TransposedDeconv(getattr(net, f'deconv{level}')))
                       for level in (5, 4, 3, 2)]
        self.predict = TapConv(net.predict_flow)


def _encoder_conv(module: nn.Module, use_winograd: bool):
    """An encoder :class:`viddet.models.layers.ConvAct` as a :class:`PackedConv`, and with
    ``use_winograd`` by Winograd F(2x2, 3x3) where that applies (the stride-1 3x3 convs ``conv3.1``
    to ``conv6.1``, on inputs of enough tiles: :mod:`viddet.speedups.winograd`)."""
    packed = PackedConv.of(module)
    if not (use_winograd and winograd.applies(module.conv)):
        return packed
    act, scalars = conv_act_spec(module.act)
    return winograd.OrDirect(winograd.WinogradConv(module.conv.weight, module.conv.bias, 1, act, scalars), packed)


class _PlanCache(FusedCache):
    def __deepcopy__(self, memo):
        return _PlanCache()

    def __reduce__(self):
        return (_PlanCache, ())


def _supported(net: nn.Module) -> bool:
    """The layer configuration the plan reproduces (FlowNetSimple as built by viddet)."""
    for m in net.modules():
        conv = getattr(m, 'conv', None)
        if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
            if conv.groups != 1 or conv.dilation != (1, 1):
                return False
            if isinstance(conv, nn.ConvTranspose2d) and (
                    conv.kernel_size != (4, 4) or conv.stride != (2, 2) or conv.padding != (1, 1)
                    or conv.output_padding != (0, 0)):
                return False
    return True


class FastFlowNetSimple(FastModule, FlowNetSimple):
    """:class:`viddet.models.flownet.FlowNetSimple` with the fast layers of this module (packed
    oneDNN weights, tap-sum flow convs, in-place concatenations, Winograd where
    ``kernels.winograd``) and the half-resolution renormalisation; each method runs the plain one
    where its fast path does not apply (autograd on, training mode, not a float32 CPU tensor, fused
    kernels off, a layer configuration :func:`_supported` does not cover, odd sizes).

    Attributes:
        plan: the layers as packed primitives (:class:`_Plan`, per weight version and kernel choice).
    """

    fast_attributes = ('plan',)

    def __init__(self, plain: FlowNetSimple, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.plan = _PlanCache()

    def _layers_apply(self, x: torch.Tensor) -> bool:
        return fused_applies(self, x) and x.dim() == 4 and x.shape[0] > 0 and _supported(self)

    def _raw_flow(self, x: torch.Tensor) -> torch.Tensor:
        """FlowNetSimple's prediction (N, 2, ceil(h/4), ceil(w/4)) of prepared pairs (N, 6, h, w),
        before the upsampling and scaling of ``forward_prepared``."""
        plan = self.plan.get(self, _Plan)
        x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for group in plan.encoder:
            for conv in group:
                x = conv(x)
            outs.append(x)
        concat = outs[5]
        for level, predict, upsample, deconv in plan.levels:
            skip = outs[level - 1]
            n, cs, hs, ws = skip.shape
            cd = deconv.out_channels
            buf = torch.empty(n, hs, ws, cs + cd + 2, dtype=x.dtype)   # NHWC concatenation
            buf[..., :cs].copy_(skip.permute(0, 2, 3, 1))
            deconv.into(concat, buf[..., cs:cs + cd])
            flow = predict(concat).contiguous(memory_format=torch.channels_last)
            upsample.into(flow, buf[..., cs + cd:])
            concat = buf.permute(0, 3, 1, 2)                          # channels-last (N, C, H, W)
        return plan.predict(concat)

    def forward_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`FlowNetSimple.forward_prepared`: (N, 6, h, w) prepared pairs -> (N, 2,
        8*ceil(h/4), 8*ceil(w/4)) contiguous flow (up to float rounding)."""
        if not self._layers_apply(x):
            return super().forward_prepared(x)
        up = 4 / self.img_scale_factor
        flow = self._raw_flow(x) * (up * self.flow_scale_factor)
        return F.interpolate(flow, scale_factor=up, mode='bilinear', align_corners=False)

    def forward_features(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """As :meth:`FlowNetSimple.forward_features` (up to float rounding), without the
        full-resolution flow.

        The plain method upsamples the prediction P (h4 x w4) by u = 8 (bilinear,
        ``align_corners=False``) and resizes the result by s = W / (8 w4) (likewise). Where the
        feature grid is half the prediction's (h4, w4 = 2H, 2W: s = 1/16, as for every padded size
        that is a multiple of 16), the resize reads the upsampled flow at x_up = 16 x + 7.5, between
        pixels 16 x + 7 and 16 x + 8, whose upsampled values are 0.5625 P[2x] + 0.4375 P[2x+1] and
        the mirror image: their mean is (P[2x] + P[2x+1]) / 2, away from every border. The
        composition is therefore the 2x2 block mean of P (times u s and the flow scale): 1/64 of the
        values, no (N, 2, Hp, Wp) temporary (46 MB for FGFA's window at 1000x600). Other sizes take
        the upsampled flow.
        """
        if not self._layers_apply(x):
            return super().forward_features(x, feat_size)
        flow = self._raw_flow(x)
        h, w = int(feat_size[0]), int(feat_size[1])
        up = 4 / self.img_scale_factor
        if up == 8 and tuple(flow.shape[-2:]) == (2 * h, 2 * w):
            scale = float(w) / (up * flow.shape[-1])                     # 1/16, as resize_flow computes it
            return F.avg_pool2d(flow, 2) * (up * self.flow_scale_factor * scale)
        flow = F.interpolate(flow * (up * self.flow_scale_factor), scale_factor=up, mode='bilinear',
                             align_corners=False)
        return resize_flow(flow, (h, w))

    def _half_into(self, imgs: torch.Tensor, img_shape: Tuple[int, int], out: torch.Tensor) -> None:
        """Writes ``self._prepare_half(imgs, img_shape)`` (scale 0.5, even padded sizes) into
        ``out`` (N, 3, Hp/2, Wp/2), a view of any strides. Bilinear 0.5x is then the mean of each
        2x2 block, and FlowNet's renormalisation ``(x * std + mean) / 255 - m`` is per-channel
        affine, so it is applied to the block sums (times 1/4); blocks in the zeroed padding are 0,
        and a block straddling the image border (odd h or w) is recomputed by the plain method from
        its two full-resolution rows / columns."""
        h, w = int(img_shape[0]), int(img_shape[1])
        dt = imgs.dtype
        scale = self.img_norm_std.to(dt) / self.flow_img_norm_std.to(dt) * 0.25
        shift = self.img_norm_mean.to(dt) / self.flow_img_norm_std.to(dt) - self.flow_img_norm_mean.to(dt)
        rows = imgs[:, :, 0::2] + imgs[:, :, 1::2]
        torch.addcmul(shift, rows[..., 0::2] + rows[..., 1::2], scale, out=out)
        h2, w2 = h // 2, w // 2
        out[:, :, h2:] = 0.0
        out[:, :, :, w2:] = 0.0
        if h % 2 and h < imgs.shape[2]:
            out[:, :, h2:h2 + 1] = self._prepare_half(imgs[:, :, h - 1:h + 1], (1, w))
        if w % 2 and w < imgs.shape[3]:
            out[:, :, :, w2:w2 + 1] = self._prepare_half(imgs[:, :, :, w - 1:w + 1], (h, 1))

    def prepare_image(self, imgs: torch.Tensor, img_shape: Tuple[int, int]) -> torch.Tensor:
        """As :meth:`FlowNetSimple.prepare_image` (up to float rounding), at half resolution
        (:meth:`_half_into`); the plain method where that does not apply (autograd on, scale not
        0.5, odd padded sizes, not (N, 3, H, W))."""
        if torch.is_grad_enabled() or self.img_scale_factor != 0.5 or imgs.dim() != 4 or imgs.shape[1] != 3 \
                or imgs.shape[2] % 2 or imgs.shape[3] % 2:
            return super().prepare_image(imgs, img_shape)
        out = imgs.new_empty(imgs.shape[0], 3, imgs.shape[2] // 2, imgs.shape[3] // 2)
        self._half_into(imgs, img_shape, out)
        return out

    def prepare_inputs(self, target_imgs: torch.Tensor, source_imgs: torch.Tensor,
                       img_shape: Tuple[int, int]) -> torch.Tensor:
        """As :meth:`FlowNetSimple.prepare_inputs` (up to float rounding), renormalising at half
        resolution (:meth:`_half_into`) straight into a channels-last result, as the network wants
        it; the plain method (which checks the inputs and raises) where that does not apply
        (autograd on, scale not 0.5, odd padded sizes, bad input)."""
        if torch.is_grad_enabled() or self.img_scale_factor != 0.5 or target_imgs.dim() != 4 \
                or source_imgs.dim() != 4 or target_imgs.shape[1] != 3 or source_imgs.shape[1] != 3 \
                or target_imgs.shape[2:] != source_imgs.shape[2:] \
                or target_imgs.shape[0] not in (1, source_imgs.shape[0]) \
                or target_imgs.shape[2] % 2 or target_imgs.shape[3] % 2 \
                or target_imgs.dtype != source_imgs.dtype or target_imgs.device != source_imgs.device:
            return super().prepare_inputs(target_imgs, source_imgs, img_shape)
        n, _, hp, wp = source_imgs.shape
        x = torch.empty(n, hp // 2, wp // 2, 6, dtype=source_imgs.dtype,
                        device=source_imgs.device).permute(0, 3, 1, 2)   # channels-last (N, 6, h, w)
        if target_imgs.shape[0] == n:
            self._half_into(target_imgs, img_shape, x[:, :3])
        else:
            tgt = x.new_empty(1, 3, hp // 2, wp // 2)
            self._half_into(target_imgs, img_shape, tgt)
            x[:, :3] = tgt
        self._half_into(source_imgs, img_shape, x[:, 3:])
        return x
