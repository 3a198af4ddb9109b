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
  Where ``kernels.winograd4`` (AMD CPUs with AVX-512) the 3x3 stride-1 convs of >= 128 channels
  run by Winograd F(4x4, 3x3) instead (:mod:`viddet.speedups.winograd4`: YOLOV-L ~17% faster).
* The backbone and neck: :mod:`viddet.speedups.cspdarknet`.
* :class:`FastYOLOVHead`, :class:`FastYOLOVPPHead`: the second class tower (``cls_convs2``), whose
  features only the selected candidates use, computed at the candidates' anchors only (and the
  3x3 neighbourhoods its second conv reads) as gathered 3x3 patches times the folded weights,
  instead of over every anchor of the three levels (:func:`tower_at`): a third of the head's
  convolution work for YOLOV's 30 candidates per frame. YOLOV's still-image class tower
  (``cls_convs`` -> ``cls_preds``) likewise runs only at each frame's top-750 anchors by
  objectness, the only ones its selection reads (YOLOV++ selects by obj · cls over every anchor).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from viddet.models.fast import FastModule
from viddet.models.yolov_head import YOLOVHead, YOLOVPPHead
from viddet.models.yolox import BaseConv, decode_grid, flat_anchors
from viddet.runtime import CpuKernels
from viddet.speedups import winograd, winograd4
from viddet.speedups.onednn import FusedCache, FusedConv, fused_applies, fused_or_winograd, matmul_nt

__all__ = ['FastBaseConv', 'SparseCls2', 'FastYOLOVHead', 'FastYOLOVPPHead', 'conv3x3_at', 'tower_at']

DENSE_FRACTION = 0.5
"""A level whose first ``cls_convs2`` conv is needed at more than this fraction of its anchors
(the candidates' 3x3 neighbourhoods) runs the dense tower (:func:`tower_at`)."""


PATCH_BYTES = 8 << 20
""":func:`conv3x3_at` gathers and multiplies the patches of this many bytes of locations at a time
(the whole level's patches are up to 180 MB, which the allocator maps fresh from the system on
every call, each first touch of a page a fault)."""


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


def conv3x3_at(x: torch.Tensor, conv: FusedConv, b: torch.Tensor, y: torch.Tensor, xs: torch.Tensor,
               gemm: str = 'mkl', rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SiLU of a 3x3, stride-1, padding-1 convolution (+ bias) at some locations only.

    Args:
        x: (B, H, W, C) the input, location-major (NHWC; a channels-last map's permuted view), or
            with ``rows`` (R, C) the input's values at some locations only.
        conv: the convolution (weight (O, C, 3, 3), bias (O,)), BN folded in.
        b, y, xs: (P,) frame, row and column of each output location.
        gemm: the GEMM library (:func:`viddet.speedups.onednn.matmul_nt`).
        rows: optional (B, H, W) long, the row of ``x`` that holds each location's input (the
            locations the patches read must have one).

    Returns:
        (P, O): ``silu(conv(x))[b, :, y, xs]``, the 3x3 patches (zero outside the map, as the
        padding) times the weight as one GEMM (the same sums as the direct convolution, in
        another order).
    """
    n, h, w = x.shape[:3] if rows is None else rows.shape
    ky, kx = torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing='ij')
    yy, xx = y[:, None] + ky.reshape(1, 9), xs[:, None] + kx.reshape(1, 9)            # (P, 9)
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    yy, xx = yy.clamp(0, h - 1), xx.clamp(0, w - 1)
    if rows is None:
        flat, source = ((b[:, None] * h + yy) * w + xx).reshape(-1), x.reshape(-1, x.shape[-1])
    else:
        flat, source = rows[b[:, None], yy, xx].reshape(-1), x
    outside = ~inside.reshape(-1)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)       # (ky, kx, c)
    out = source.new_empty(len(b), weight.shape[0])
    step = max(1, PATCH_BYTES // (weight.shape[1] * source.element_size()))
    for start in range(0, len(b), step):
        taps = slice(9 * start, 9 * (start + step))
        patches = source.index_select(0, flat[taps])                                # (p * 9, C)
        zero = outside[taps].nonzero().squeeze(1)
        if len(zero):
            patches.index_fill_(0, zero, 0)                                          # those rows only
        out[start:start + step] = matmul_nt(patches.view(-1, weight.shape[1]), weight, conv.bias, gemm)
    return F.silu(out, inplace=True)


def tower_at(x: torch.Tensor, convs: Sequence[FusedConv], b: torch.Tensor, y: torch.Tensor,
             xs: torch.Tensor, gemm: str = 'mkl', dense: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Two stacked 3x3 conv + BN + SiLU (a ``cls_convs2`` tower, BN folded) at some locations.

    The first conv runs at the in-map 3x3 neighbourhoods of the locations (all the second one
    reads), the second at the locations, both by :func:`conv3x3_at` (the second reads the
    first's outputs through a table of their rows: no map is materialised); where the
    neighbourhoods cover more than :data:`DENSE_FRACTION` of the map, the two convolutions run
    densely (``dense``, the tower's own fast modules, where given: Winograd where it applies; else
    oneDNN) and are gathered.

    Args:
        x: (B, C, H, W) the tower's input (the head's stem output of one level).
        convs: the two folded convolutions.
        b, y, xs: (P,) frame, row and column of each location.
        dense: optional, the tower as a module (x -> its output map), for the dense case.

    Returns:
        (P, C) the tower's output at the locations.
    """
    n, _, h, w = x.shape
    need = torch.zeros(n, 1, h, w, dtype=x.dtype, device=x.device)
    need[b, 0, y, xs] = 1
    need = F.max_pool2d(need, 3, 1, 1)[:, 0] > 0                              # 3x3 neighbourhoods
    nb, ny, nx = torch.nonzero(need, as_tuple=True)
    x = x.contiguous(memory_format=torch.channels_last)
    if len(nb) > DENSE_FRACTION * need.numel():
        out = dense(x) if dense is not None else convs[1](convs[0](x, 'swish'), 'swish')
        return out.permute(0, 2, 3, 1)[b, y, xs]
    first = conv3x3_at(x.permute(0, 2, 3, 1), convs[0], nb, ny, nx, gemm)     # (P', C)
    rows = torch.zeros(n, h, w, dtype=torch.long, device=x.device)
    rows[nb, ny, nx] = torch.arange(len(nb), device=x.device)
    return conv3x3_at(first, convs[1], b, y, xs, gemm, rows)


class SparseCls2:
    """``cls2_at``, ``reg_at`` and ``box_level`` of a fast video head (a base class before
    :class:`viddet.models.fast.FastModule`): the ``cls_convs2`` features of the candidates only
    (:func:`tower_at` per level), where the plain head computes them over every anchor and
    gathers; the candidates' ``reg_convs`` features from the three maps (the plain head flattens
    every anchor's first: 84 MB for YOLOV-L's 12 frames); the box and objectness predictions (two
    1x1 convs of 4 and 1 outputs, which PyTorch runs by im2col) as one product of the box branch's location-major features. The plain methods
    where the fused kernels do not apply."""

    fast_attributes = ('folded',)

    def __init__(self, plain, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.folded = FusedCache()

    def _fold(self, _) -> dict:
        box = [(torch.cat([r.weight, o.weight]).detach().flatten(1), torch.cat([r.bias, o.bias]).detach())
               for r, o in zip(self.reg_preds, self.obj_preds)]
        return {'towers': [[FusedConv(m.conv, m.bn) for m in tower] for tower in self.cls_convs2], 'box': box}

    def box_level(self, k: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not fused_applies(self, x):
            return super().box_level(k, x)
        weight, bias = self.folded.get(self, self._fold)['box'][k]
        stem = self.stems[k](x)
        reg = self.reg_convs[k](stem)
        n, c, h, w = reg.shape
        rows = reg.permute(0, 2, 3, 1).reshape(-1, c)                    # a view of a channels-last map
        box = matmul_nt(rows, weight, bias, self.kernels.gemm).view(n, h, w, -1).permute(0, 3, 1, 2)
        return stem, reg, box

    def reg_at(self, regs: Sequence[torch.Tensor], idx: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if not fused_applies(self, regs[0]):
            return super().reg_at(regs, idx)
        # the maps themselves, not flattened
        return _at_anchors(regs, idx, lambda k, fb, y, xs: regs[k].permute(0, 2, 3, 1)[fb, y, xs])

    def cls2_at(self, stems: Sequence[torch.Tensor], idx: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if not fused_applies(self, stems[0]):
            return super().cls2_at(stems, idx)
        towers = self.folded.get(self, self._fold)['towers']
        return _at_anchors(stems, idx, lambda k, fb, y, xs: tower_at(
            stems[k], towers[k], fb, y, xs, self.kernels.gemm, self.cls_convs2[k]))


def _at_anchors(maps: Sequence[torch.Tensor], idx: Sequence[torch.Tensor], values) -> List[torch.Tensor]:
    """Per frame b, the (n_b, C) rows ``values(level, frame, row, column)`` gives for the anchors
    ``idx[b]`` (flat indices, level order) of the per-level maps ``maps`` (B, C, H_l, W_l)."""
    frame = torch.cat([torch.full((len(i),), k, dtype=torch.long) for k, i in enumerate(idx)])
    anchor = torch.cat(list(idx)).long()
    out = maps[0].new_empty(len(anchor), maps[0].shape[1])
    for k, here, fb, y, xs in _level_locations(anchor, frame, [tuple(m.shape[-2:]) for m in maps]):
        out[here] = values(k, fb, y, xs)
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
            feat = tower_at(stems[k], folded['cls'][k], fb, y, xs, self.kernels.gemm, self.cls_convs[k])
            weight, bias = folded['pred'][k]
            decoded[fb, anchor[here], 5:] = matmul_nt(feat, weight, bias, self.kernels.gemm).sigmoid()
        return decoded, stems, regs

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        top = torch.topk(rows[:, 4], k=min(self.pre, rows.shape[0])).indices
        if bool(rows[top, 5].isnan().any()):
            raise RuntimeError('an anchor among the top-pre by objectness has no class scores: the fast '
                               'head computed them for other anchors than the selection takes')
        return super().select(rows)


class FastYOLOVPPHead(SparseCls2, FastModule, YOLOVPPHead):
    """:class:`YOLOVPPHead` with the candidates' ``cls_convs2`` features computed at the candidates
    only (:class:`SparseCls2`); its convolutions are :class:`FastBaseConv`."""
