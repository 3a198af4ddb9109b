"""The fast modules of YOLOX's backbone and neck (:mod:`viddet.models.yolox`): CSPDarknet on the
frames' part of the letterbox, its stem and spatial pyramid pooling, and the PAFPN a few frames
at a time. Each computes the same values as its plain module (up to float rounding; the pools
exactly) and runs the plain method wherever its fast path does not apply (protocol:
:mod:`viddet.models.fast`).

* :class:`FastCSPDarknet`: the letterbox pastes the frame top-left on a grey canvas (a 16:9 video
  fills 324 of 576 rows); the stem and dark2..dark4 run on the frame's part plus the rows their
  convolutions reach (:func:`run_cropped`), the rest of each map is a blank canvas's, computed once
  per input size. dark5's pools spread the frame over the whole map: from there on every map is
  computed in full.
* :class:`FastFocus`: the stem's space-to-depth + 3x3 conv as one 6x6 stride-2 convolution of the
  image (the same products, without the four-phase copy).
* :class:`FastSPPBottleneck`: the 5/9/13 max pools as a cascade of 5-wide pools, each a row pool
  then a column pool (:func:`cascade_pools`; max is exact in any order).
* :class:`FastPAFPN`: the backbone and neck :data:`FRAME_CHUNK` frames at a time (they are per
  frame), so that their maps stay small (see there).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from viddet.models.fast import FastModule
from viddet.models.yolox import PAD_VALUE, PAFPN, BaseConv, CSPDarknet, CSPLayer, Focus, SPPBottleneck
from viddet.runtime import CpuKernels
from viddet.speedups.memo import weights_version
from viddet.speedups.onednn import FusedCache, FusedConv, fused_applies

__all__ = ['FastCSPDarknet', 'FastFocus', 'FastSPPBottleneck', 'FastPAFPN', 'FRAME_CHUNK', 'cascade_pools',
           'focus_weight', 'frame_extent', 'run_cropped', 'stage_reach', 'walk_stage']

FRAME_CHUNK = 4
"""Frames the :class:`FastPAFPN` runs at a time. A batch of 12 frames at 576 x 576 makes maps of
30-150 MB (S to L), which the allocator maps fresh from the system on every call (each first touch
of a page a fault), and which leave the cache between layers; 4 frames at a time ran the backbone
and neck 7% (YOLOV-S) and 5% (YOLOV-L) faster on the 2-core AMD EPYC (one thread; 3 frames
the same, 2 frames slower for S: `benchmarks/RESULTS.md`)."""


def frame_extent(x: torch.Tensor, pad_value: float = PAD_VALUE) -> Tuple[int, int]:
    """(rows, columns) of the top-left rectangle outside which every value of the batch ``x`` (N, C,
    H, W) equals ``pad_value``: the letterbox's frame (:func:`viddet.models.yolox.letterbox`), or a
    smaller rectangle where the frame's last rows or columns happen to be grey 114 themselves."""
    content = (x != pad_value).flatten(0, 1).any(0)                          # (H, W)
    rows, cols = content.any(1).nonzero(), content.any(0).nonzero()
    return (int(rows[-1]) + 1 if len(rows) else 0), (int(cols[-1]) + 1 if len(cols) else 0)


def stage_reach(stage: torch.nn.Module) -> int:
    """How many rows (and columns) beyond its input's own the output of a stage differs from a blank
    input's, counted at the stage's output resolution: one per 3x3 convolution or max pool radius,
    strided ones included (an upper bound, whatever their order)."""
    reach = 0
    for m in stage.modules():
        if isinstance(m, torch.nn.Conv2d):
            reach += (m.kernel_size[0] // 2) * m.dilation[0]
        elif isinstance(m, torch.nn.MaxPool2d):
            reach += m.kernel_size // 2 if isinstance(m.kernel_size, int) else m.kernel_size[0] // 2
    return reach


def _with_blank(frame: torch.Tensor, blank: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The top-left ``size`` of ``blank`` (1, C, H, W) for each frame, ``frame`` (N, C, r, c) pasted in
    its top-left corner; channels-last."""
    r, c = frame.shape[-2:]
    out = torch.empty((len(frame), blank.shape[1], *size), dtype=frame.dtype,
                      memory_format=torch.channels_last)
    out[..., :r, :c] = frame
    out[..., r:, :] = blank[..., r:size[0], :size[1]]
    out[..., :r, c:] = blank[..., :r, c:size[1]]
    return out


def run_cropped(stage: torch.nn.Module, frame: torch.Tensor, blank_in: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """A stage (one stride-``stride`` step of CSPDarknet) on the part of its input that holds the frame.

    Outside the top-left (r, c) of its input the frames equal the blank canvas's map (``blank_in``);
    outside the top-left (r', c'), r' = ceil(r / stride) + reach (:func:`stage_reach`), its output
    equals the blank canvas's output. The stage runs on the input's top-left (R, C),
    R = stride · (ceil(r / stride) + 2 · reach) (the whole height where that is more), frame rows
    then blank rows: the output rows [0, r') it gives are exact, the last ``reach`` rows of its
    output (next to the artificial border) are not and are dropped.

    Args:
        frame: (N, C, r, c) the frames' part of the stage input.
        blank_in: (1, C, H, W) the blank canvas's map at the stage input.

    Returns:
        (N, C', r', c') the frames' part of the stage output.
    """
    reach = stage_reach(stage)
    h, w = blank_in.shape[-2:]
    r, c = frame.shape[-2:]
    out_size = [min(-(-r // stride) + reach, h // stride), min(-(-c // stride) + reach, w // stride)]
    crop = (min(stride * (-(-r // stride) + 2 * reach), h), min(stride * (-(-c // stride) + 2 * reach), w))
    out = stage(frame if crop == (r, c) else _with_blank(frame, blank_in, crop))
    return out[..., :out_size[0], :out_size[1]]


class _BlankRecorder:
    """:func:`walk_stage` on a blank canvas's map: runs each layer, keeps each layer's input."""

    def __init__(self):
        self.maps: List[torch.Tensor] = []

    def layer(self, module: torch.nn.Module, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        self.maps.append(x)
        return module(x)

    def cat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.maps.append(b)
        return torch.cat([a, b], 1)


class _CroppedRunner:
    """:func:`walk_stage` on the frames' part of a map: each layer by :func:`run_cropped` with the
    blank canvas's input of that layer (recorded by :class:`_BlankRecorder`, same order)."""

    def __init__(self, maps: Sequence[torch.Tensor]):
        self.maps = iter(maps)

    def layer(self, module: torch.nn.Module, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        return run_cropped(module, x, next(self.maps), stride)

    def cat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        blank_b = next(self.maps)           # b's part is never larger than a's: a had more layers
        if b.shape[-2:] != a.shape[-2:]:
            b = _with_blank(b, blank_b, tuple(a.shape[-2:]))
        return torch.cat([a, b], 1)


def walk_stage(stage: torch.nn.Module, x: torch.Tensor, run) -> torch.Tensor:
    """One CSPDarknet stage (stride-2 :class:`BaseConv`, then a :class:`CSPLayer`: two 1x1 branches,
    bottlenecks on the first, concatenated, a 1x1 conv) layer by layer through ``run`` (its
    ``layer(module, x, stride)`` and ``cat(a, b)``): run on the frames' part, each layer computes
    only the rows and columns its own input's frame part and its own reach give (one per 3x3
    conv so far), where cropping the stage as a whole computes every layer at the stage's reach
    plus the rows that absorb the crop's artificial border."""
    x = run.layer(stage[0], x, 2)
    csp = stage[1]
    a, b = run.layer(csp.conv1, x), run.layer(csp.conv2, x)
    for bottleneck in csp.m:
        a = run.layer(bottleneck, a)
    return run.layer(csp.conv3, run.cat(a, b))


def _walkable(stage: torch.nn.Module) -> bool:
    return (isinstance(stage, torch.nn.Sequential) and len(stage) == 2 and isinstance(stage[0], BaseConv)
            and isinstance(stage[1], CSPLayer))


class FastCSPDarknet(FastModule, CSPDarknet):
    """:class:`CSPDarknet` that leaves out the letterbox's grey padding where it can: the stem and
    dark2..dark4 run on the frames' part of their input (:func:`run_cropped`; dark2..dark4 layer by
    layer, :func:`walk_stage`), and the rest of each map is copied from the maps of a blank
    (all-114) canvas of the same size, computed once per input size and weights (``blank``).
    dark5, whose pooling spreads the frame over the whole map, and everything after it run in
    full. The same values as the plain backbone (up to float rounding): outside the frame's reach,
    a convolution of the frame's map and of the blank map sum the same numbers. A 1280 x 720 frame
    at 576 x 576 is 576 x 324 of frame over 252 rows of grey.

    Attributes:
        blank: ((input size, weights version), [the blank canvas (1, 3, H, W), its dark3 and dark4
            outputs, and for dark2, dark3 and dark4 the list of each layer's input for it]).
    """

    fast_attributes = ('blank',)

    def __init__(self, plain: CSPDarknet, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.blank = (None, [])

    def blank_maps(self, x: torch.Tensor) -> list:
        """The blank canvas of ``x``'s size, its dark3 and dark4 outputs, and each stage's layers'
        inputs for it (see ``blank``)."""
        key = (tuple(x.shape[1:]), x.dtype, weights_version(self), self.kernels)
        if self.blank[0] != key:
            canvas = x.new_full((1, *x.shape[1:]), float(PAD_VALUE))
            y, outs, layers = self.stem(canvas), [], []
            for stage in (self.dark2, self.dark3, self.dark4):
                recorder = _BlankRecorder()
                y = walk_stage(stage, y, recorder) if _walkable(stage) else recorder.layer(stage, y, 2)
                outs.append(y)
                layers.append(recorder.maps)
            self.blank = (key, [canvas, outs[1], outs[2], *layers])
        return self.blank[1]

    def forward(self, x: torch.Tensor):
        if not fused_applies(self, x) or x.shape[-1] % 32 or x.shape[-2] % 32:
            return super().forward(x)
        rows, cols = frame_extent(x)
        if (rows, cols) == tuple(x.shape[-2:]):
            return super().forward(x)
        canvas, blank3, blank4, *layers = self.blank_maps(x)
        frame = run_cropped(self.stem, x[..., :rows, :cols], canvas)
        parts = []
        for stage, maps in zip((self.dark2, self.dark3, self.dark4), layers):
            run = _CroppedRunner(maps)
            frame = walk_stage(stage, frame, run) if _walkable(stage) else run.layer(stage, frame, 2)
            parts.append(frame)
        c3, c4 = (_with_blank(p, b, tuple(b.shape[-2:])) for p, b in zip(parts[1:], (blank3, blank4)))
        return c3, c4, self.dark5(c4)


def focus_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight (O, C, 2k, 2k) of the stride-2, padding-2p convolution of an image (N, C, H, W)
    that equals :class:`viddet.models.yolox.Focus`'s k x k, padding-p convolution (weight
    (O, 4C, k, k)) of its space-to-depth map: phase (dy, dx) of input channel c, stacked in the
    order (0, 0), (1, 0), (0, 1), (1, 1), at tap (ky, kx) reads image pixel (2 ky + dy, 2 kx + dx)
    of the 2k x 2k window."""
    o, c4, k, _ = weight.shape
    c = c4 // 4
    out = weight.new_zeros(o, c, 2 * k, 2 * k)
    for phase, (dy, dx) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        out[:, :, dy::2, dx::2] = weight[:, phase * c:(phase + 1) * c]
    return out


class FastFocus(FastModule, Focus):
    """:class:`Focus` (space-to-depth, then conv -> BN -> SiLU) as one fused oneDNN convolution of the
    image itself (:func:`focus_weight`; BN folded, SiLU as the post-op, channels-last output): no
    four-phase copy of the image. Same values up to float rounding; even-sized inputs (the plain
    module fails on others).

    Attributes:
        fused: the folded 2k x 2k convolution (:class:`viddet.speedups.onednn.FusedCache`).
    """

    fast_attributes = ('fused',)

    def __init__(self, plain: Focus, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.fused = FusedCache()

    @staticmethod
    def _fold(m) -> dict:
        inner = FusedConv(m.conv.conv, m.conv.bn)
        p = m.conv.conv.padding[0]
        return {'conv': FusedConv.of(focus_weight(inner.weight), inner.bias, stride=2, padding=2 * p)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv.conv
        if (not fused_applies(self, x) or x.shape[-1] % 2 or x.shape[-2] % 2 or conv.stride != (1, 1)
                or conv.dilation != (1, 1) or conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1]):
            return super().forward(x)
        fused = self.fused.get(self, self._fold)['conv']
        return fused(x.contiguous(memory_format=torch.channels_last), 'swish')


def _row_column_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """Stride-1 k x k max pool (padding k // 2) as a 1 x k pool then a k x 1 pool."""
    return F.max_pool2d(F.max_pool2d(x, (1, k), 1, (0, k // 2)), (k, 1), 1, (k // 2, 0))


def cascade_pools(x: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    """Stride-1 max pools of odd sizes ``sizes`` (ascending; padding k // 2, as SPP's) of x (N, C, H,
    W): each from the previous one by a pool of the size that widens its window to the next (a
    13 x 13 window is the union of the 5 x 5 windows around a 9 x 9 one), each pool a row then a
    column pool. Max is exact: the same values as ``F.max_pool2d(x, k, 1, k // 2)``; 5-6x faster
    for SPP's (5, 9, 13) on channels-last maps of 256-512 channels at 18 x 18."""
    out, window = [], 1
    for k in sizes:
        x = _row_column_pool(x, k - window + 1)
        out.append(x)
        window = k
    return out


def _cascadable(pools) -> bool:
    sizes = [p.kernel_size for p in pools]
    return (all(isinstance(p, torch.nn.MaxPool2d) and isinstance(k, int) and k % 2 == 1 and p.stride in (1, (1, 1))
                and p.padding == k // 2 and p.dilation == 1 and not p.ceil_mode for p, k in zip(pools, sizes))
            and sizes == sorted(set(sizes)))


class FastSPPBottleneck(FastModule, SPPBottleneck):
    """:class:`SPPBottleneck` with its max pools by :func:`cascade_pools` (same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_applies(self, x) or not _cascadable(self.m):
            return super().forward(x)
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + cascade_pools(x, [p.kernel_size for p in self.m]), dim=1))


class FastPAFPN(FastModule, PAFPN):
    """:class:`PAFPN` (CSPDarknet + YOLOX's neck, per frame) run :data:`FRAME_CHUNK` frames at a
    time, the outputs concatenated: the same values."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not fused_applies(self, x) or len(x) <= FRAME_CHUNK:
            return super().forward(x)
        parts = [super(FastPAFPN, self).forward(chunk) for chunk in x.split(FRAME_CHUNK)]
        return tuple(torch.cat(level) for level in zip(*parts))
