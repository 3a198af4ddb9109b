"""The fast modules of YOLOX and the YOLOV / YOLOV++ heads (:mod:`viddet.models.yolox`,
:mod:`viddet.models.yolov_head`): each a subclass of the plain module that computes the same values
(up to float rounding) faster at inference, and runs the plain method wherever its fast path does
not apply (protocol: :mod:`viddet.models.fast`).

* :class:`FastBaseConv`: conv + BatchNorm + SiLU as one oneDNN primitive (BN folded into the conv's
  weight and bias, SiLU as its ``swish`` post-op) in channels-last memory format. Every convolution
  of CSPDarknet, the PAFPN and the head's towers is one: the plain modules run them as a conv
  (PyTorch takes its slow im2col kernel for the 1x1 ones), a BN pass and a SiLU pass, all NCHW, and
  the SPP max pools of an NCHW map are ~15x slower than of a channels-last one (which the fused
  convs hand on). Where ``kernels.winograd`` (by default on CPUs without AVX-512), the 3x3
  stride-1 convs of >= 128 channels run by Winograd F(2x2, 3x3) (:mod:`viddet.speedups.winograd`),
  one frame at a time (for a batch of 12 frames at once its transforms leave the cache: 2.3x slower
  than per frame). On the AVX-512 AMD CPU measured it is off by default, as everywhere with
  AVX-512: there it is 1.2-1.5x faster than oneDNN's direct kernel per frame at 256-512 channels but
  2x slower at 128 (YOLOV-L 8% faster with it on ``>= 256`` only; ``benchmarks/RESULTS.md``).
  Where ``kernels.winograd4`` (AMD CPUs with AVX-512) the 3x3 stride-1 convs of >= 256 channels
  run by Winograd F(4x4, 3x3) instead (:mod:`viddet.speedups.winograd4`: YOLOV-L ~17% faster).
* :class:`FastCSPDarknet`: the letterbox pastes the frame top-left on a grey canvas (a 16:9 video
  fills 324 of 576 rows); the stem and dark2..dark4 run on the frame's part plus the rows their
  convolutions reach (:func:`run_cropped`), the rest of each map is a blank canvas's, computed once
  per input size. dark5's pools spread the frame over the whole map: from there on every map is
  computed in full.
* :class:`FastYOLOVHead`, :class:`FastYOLOVPPHead`: the second class tower (``cls_convs2``), whose
  features only the selected candidates use, computed at the candidates' anchors only (and the
  3x3 neighbourhoods its second conv reads) as gathered 3x3 patches times the folded weights,
  instead of over every anchor of the three levels (:func:`tower_at`): a third of the head's
  convolution work for YOLOV's 30 candidates per frame. YOLOV's still-image class tower
  (``cls_convs`` -> ``cls_preds``) likewise runs only at each frame's top-750 anchors by
  objectness, the only ones its selection reads (YOLOV++ selects by obj · cls over every anchor).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from viddet.models.fast import FastModule
from viddet.models.yolov_head import YOLOVHead, YOLOVPPHead
from viddet.models.yolox import PAD_VALUE, BaseConv, CSPDarknet, decode_grid, flat_anchors
from viddet.runtime import CpuKernels
from viddet.speedups import winograd, winograd4
from viddet.speedups.memo import weights_version
from viddet.speedups.onednn import FusedCache, FusedConv, fused_applies, fused_or_winograd, matmul_nt

__all__ = ['FastBaseConv', 'FastCSPDarknet', 'frame_extent', 'run_cropped', 'stage_reach', 'SparseCls2', 'FastYOLOVHead', 'FastYOLOVPPHead', 'conv3x3_at', 'tower_at']

DENSE_FRACTION = 0.5
"""A level whose first ``cls_convs2`` conv is needed at more than this fraction of its anchors
(the candidates' 3x3 neighbourhoods) runs the dense tower (:func:`tower_at`)."""


class FastBaseConv(FastModule, BaseConv):
    """:class:`BaseConv` (conv -> BN, eps 1e-3 -> SiLU) as one fused oneDNN convolution with the BN
    folded in and SiLU as the ``swish`` post-op, in channels-last memory format (its output is
    channels-last; any layout of the input is taken). Same values up to float rounding.

    Attributes:
        fused: the folded convolution (:class:`viddet.speedups.onednn.FusedCache`).
    """

    fast_attributes = ('fused',)

    def __init__(self, plain: BaseConv, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.fused = FusedCache()

    def folded(self):
        """The conv with the BN folded in (cached until a parameter, buffer or the kernels change):
        a :class:`FusedConv`; where ``kernels.winograd`` and it applies (3x3, stride 1, >= 128
        channels) a :class:`viddet.speedups.winograd.OrDirect`; else where ``kernels.winograd4``
        and it applies a :class:`viddet.speedups.winograd4.Winograd4Conv`."""
        return self.fused.get(self, self._fold)['conv']

    @staticmethod
    def _fold(m) -> dict:
        conv = fused_or_winograd(m.conv, m.bn, m.kernels.winograd)
        if isinstance(conv, FusedConv) and m.kernels.winograd4 and winograd4.applies(m.conv):
            conv = winograd4.Winograd4Conv(conv.weight, conv.bias)
        return {'conv': conv}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_applies(self, x):
            return super().forward(x)
        conv = self.folded()
        x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(conv, winograd.OrDirect):   # one frame at a time: its transforms stay in cache
            return F.silu(torch.cat([conv(frame) for frame in x.split(1)]), inplace=True)
        return conv(x, 'swish')


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
    out = torch.empty((len(frame), blank.shape[1], *size), dtype=frame.dtype,
                      memory_format=torch.channels_last)
    out.copy_(blank[..., :size[0], :size[1]].expand(len(frame), -1, -1, -1))
    out[..., :frame.shape[-2], :frame.shape[-1]] = frame
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
    out = stage(_with_blank(frame, blank_in, crop))
    return out[..., :out_size[0], :out_size[1]]


class FastCSPDarknet(FastModule, CSPDarknet):
    """:class:`CSPDarknet` that leaves out the letterbox's grey padding where it can: the stem and
    dark2..dark4 run on the frames' part of their input (:func:`run_cropped`), and the rest of each
    map is copied from the maps of a blank (all-114) canvas of the same size, computed once per
    input size and weights (``blank``). dark5, whose pooling spreads the frame over the whole map,
    and everything after it run in full. The same values as the plain backbone (up to float
    rounding): outside the frame's reach, a convolution of the frame's map and of the blank map sum
    the same numbers. A 1280 x 720 frame at 576 x 576 is 576 x 324 of frame over 252 rows of grey.

    Attributes:
        blank: ((input size, weights version), [the blank canvas (1, 3, H, W) and the stem's,
            dark2's, dark3's and dark4's outputs for it]).
    """

    fast_attributes = ('blank',)

    def __init__(self, plain: CSPDarknet, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.blank = (None, [])

    def blank_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The blank canvas of ``x``'s size and its maps after the stem, dark2, dark3, dark4."""
        key = (tuple(x.shape[1:]), x.dtype, weights_version(self), self.kernels)
        if self.blank[0] != key:
            maps = [x.new_full((1, *x.shape[1:]), float(PAD_VALUE))]
            for stage in (self.stem, self.dark2, self.dark3, self.dark4):
                maps.append(stage(maps[-1]))
            self.blank = (key, maps)
        return self.blank[1]

    def forward(self, x: torch.Tensor):
        if not fused_applies(self, x) or x.shape[-1] % 32 or x.shape[-2] % 32:
            return super().forward(x)
        rows, cols = frame_extent(x)
        if (rows, cols) == tuple(x.shape[-2:]):
            return super().forward(x)
        blanks = self.blank_maps(x)
        frame = x[..., :rows, :cols]
        parts = []
        for k, stage in enumerate((self.stem, self.dark2, self.dark3, self.dark4)):
            frame = run_cropped(stage, frame, blanks[k])
            parts.append(frame)
        c3, c4 = (_with_blank(p, b, tuple(b.shape[-2:])) for p, b in zip(parts[2:], blanks[3:]))
        return c3, c4, self.dark5(c4)


def conv3x3_at(x: torch.Tensor, conv: FusedConv, b: torch.Tensor, y: torch.Tensor, xs: torch.Tensor,
               gemm: str = 'mkl') -> torch.Tensor:
    """SiLU of a 3x3, stride-1, padding-1 convolution (+ bias) at some locations only.

    Args:
        x: (B, H + 2, W + 2, C) the zero-padded input, location-major (NHWC).
        conv: the convolution (weight (O, C, 3, 3), bias (O,)), BN folded in.
        b, y, xs: (P,) frame, row and column of each output location (unpadded coordinates).
        gemm: the GEMM library (:func:`viddet.speedups.onednn.matmul_nt`).

    Returns:
        (P, O): ``silu(conv(x))[b, :, y, xs]``, the 3x3 patches times the weight as one GEMM
        (the same sums as the direct convolution, in another order).
    """
    ky, kx = torch.meshgrid(torch.arange(3), torch.arange(3), indexing='ij')
    hp, wp, c = x.shape[1:]
    flat = ((b[:, None] * hp + y[:, None] + ky.reshape(1, 9)) * wp + xs[:, None] + kx.reshape(1, 9)).reshape(-1)
    patches = x.reshape(-1, c).index_select(0, flat).reshape(len(b), -1)    # (P, 9C): (ky, kx, c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)
    return F.silu(matmul_nt(patches, weight, conv.bias, gemm))


def tower_at(x: torch.Tensor, convs: Sequence[FusedConv], b: torch.Tensor, y: torch.Tensor,
             xs: torch.Tensor, gemm: str = 'mkl') -> torch.Tensor:
    """Two stacked 3x3 conv + BN + SiLU (a ``cls_convs2`` tower, BN folded) at some locations.

    The first conv runs at the in-map 3x3 neighbourhoods of the locations (all the second one
    reads; the rest of its map stays zero, as is its padding), the second at the locations, both
    by :func:`conv3x3_at`; where the neighbourhoods cover more than :data:`DENSE_FRACTION` of the
    map, the two convolutions run densely (oneDNN) and are gathered.

    Args:
        x: (B, C, H, W) the tower's input (the head's stem output of one level).
        convs: the two folded convolutions.
        b, y, xs: (P,) frame, row and column of each location.

    Returns:
        (P, C) the tower's output at the locations.
    """
    n, _, h, w = x.shape
    need = torch.zeros(n, 1, h, w, dtype=x.dtype, device=x.device)
    need[b, 0, y, xs] = 1
    need = F.max_pool2d(need, 3, 1, 1)[:, 0] > 0                              # 3x3 neighbourhoods
    nb, ny, nx = torch.nonzero(need, as_tuple=True)
    if len(nb) > DENSE_FRACTION * need.numel():
        x = x.contiguous(memory_format=torch.channels_last)
        out = convs[1](convs[0](x, 'swish'), 'swish')
        return out.permute(0, 2, 3, 1)[b, y, xs]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))               # (B, H + 2, W + 2, C)
    first = padded.new_zeros(n, h + 2, w + 2, convs[0].weight.shape[0])
    first[nb, ny + 1, nx + 1] = conv3x3_at(padded, convs[0], nb, ny, nx, gemm)
    return conv3x3_at(first, convs[1], b, y, xs, gemm)


class SparseCls2:
    """``cls2_at`` of a fast video head (a base class before :class:`viddet.models.fast.FastModule`):
    the ``cls_convs2`` features of the candidates only (:func:`tower_at` per level), where the
    plain head computes them over every anchor and gathers; the plain ``cls2_at`` where the fused
    kernels do not apply."""

    fast_attributes = ('folded',)

    def __init__(self, plain, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.folded = FusedCache()

    def _fold(self, _) -> dict:
        return {'towers': [[FusedConv(m.conv, m.bn) for m in tower] for tower in self.cls_convs2]}

    def cls2_at(self, stems: Sequence[torch.Tensor], idx: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if not fused_applies(self, stems[0]):
            return super().cls2_at(stems, idx)
        towers = self.folded.get(self, self._fold)['towers']
        frame = torch.cat([torch.full((len(i),), k, dtype=torch.long) for k, i in enumerate(idx)])
        anchor = torch.cat(list(idx)).long()
        out = stems[0].new_empty(len(anchor), stems[0].shape[1])
        start = 0
        for x, convs in zip(stems, towers):
            h, w = x.shape[-2:]
            here = (anchor >= start) & (anchor < start + h * w)
            if bool(here.any()):
                local = anchor[here] - start
                out[here] = tower_at(x, convs, frame[here], local // w, local % w, self.kernels.gemm)
            start += h * w
        return list(out.split([len(i) for i in idx]))


def _level_locations(anchor: torch.Tensor, frame: torch.Tensor, sizes: Sequence[Tuple[int, int]]):
    """(level, frame, row, column) of flat anchor indices (level order, row-major within a level)."""
    start = 0
    for k, (h, w) in enumerate(sizes):
        here = (anchor >= start) & (anchor < start + h * w)
        if bool(here.any()):
            local = anchor[here] - start
            yield k, here, frame[here], local // w, local % w
        start += h * w


class FastYOLOVHead(SparseCls2, FastModule, YOLOVHead):
    """:class:`YOLOVHead` with both class towers computed only where YOLOV reads them: the
    candidates' ``cls_convs2`` features at the candidates (:class:`SparseCls2`), and the still-image
    class scores (``cls_convs`` -> ``cls_preds``) at the ``pre`` anchors of highest objectness of
    each frame, the only anchors whose class scores the selection (:func:`select_top_nms`: top-``pre``
    by objectness, then NMS by obj · cls) and every later step read. Its convolutions are
    :class:`FastBaseConv`.

    The boxes and objectness (``reg_convs`` -> ``reg_preds``, ``obj_preds``) are computed at every
    anchor, as the selection needs. ``HeadOutput.decoded``'s class scores are therefore NaN (never
    computed) outside each frame's top-``pre`` anchors; :meth:`select` refuses a row without them.
    """

    def _fold(self, module) -> dict:
        folded = super()._fold(module)
        folded['cls'] = [[FusedConv(m.conv, m.bn) for m in tower] for tower in self.cls_convs]
        folded['pred'] = [(p.weight.detach().flatten(1), p.bias.detach()) for p in self.cls_preds]
        return folded

    def still_parts(self, feats: Sequence[torch.Tensor]):
        if not fused_applies(self, feats[0]):
            return super().still_parts(feats)
        folded = self.folded.get(self, self._fold)
        stems, regs, boxes = [], [], []
        for k, x in enumerate(feats):
            x, reg_feat, box = self.box_level(k, x)
            stems.append(x)
            regs.append(reg_feat)
            boxes.append(torch.cat([box[:, :4], box[:, 4:].sigmoid()], 1))
        sizes = [tuple(b.shape[-2:]) for b in boxes]
        box_flat = flat_anchors(boxes)                                                 # (B, A, 5)
        n, a = box_flat.shape[:2]
        decoded = box_flat.new_full((n, a, 5 + self.num_classes), float('nan'))
        decoded[..., :5] = box_flat
        decoded = decode_grid(decoded, sizes)
        # the anchors select_top_nms keeps: the same topk call on the same objectness values
        top = [torch.topk(decoded[b, :, 4].contiguous(), k=min(self.pre, a)).indices for b in range(n)]
        frame = torch.cat([torch.full((len(t),), b, dtype=torch.long) for b, t in enumerate(top)])
        anchor = torch.cat(top)
        for k, here, fb, y, xs in _level_locations(anchor, frame, sizes):
            feat = tower_at(stems[k], folded['cls'][k], fb, y, xs, self.kernels.gemm)
            weight, bias = folded['pred'][k]
            decoded[fb, anchor[here], 5:] = matmul_nt(feat, weight, bias, self.kernels.gemm).sigmoid()
        return decoded, stems, flat_anchors(regs)

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        top = torch.topk(rows[:, 4], k=min(self.pre, rows.shape[0])).indices
        if bool(rows[top, 5].isnan().any()):
            raise RuntimeError('an anchor among the top-pre by objectness has no class scores: the fast '
                               'head computed them for other anchors than the selection takes')
        return super().select(rows)


class FastYOLOVPPHead(SparseCls2, FastModule, YOLOVPPHead):
    """:class:`YOLOVPPHead` with the candidates' ``cls_convs2`` features computed at the candidates
    only (:class:`SparseCls2`); its convolutions are :class:`FastBaseConv`."""
