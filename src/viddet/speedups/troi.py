"""Temporal RoI Align, re-associated (:class:`FastTemporalRoIAlign`): the same numbers as
:class:`viddet.models.temporal_roi_align.TemporalRoIAlign` (up to float summation order) at a
fraction of the FLOPs, for inference.

Both steps of Temporal RoI Align (Gong et al., AAAI 2021, §3) are linear in the feature maps, so
they can be re-associated:

* a RoI point is a bilinear combination of 16 key-map pixels (:func:`roi_align_taps`), so its
  similarities to all reference locations are the same combination of the rows of the
  (H*W, H'*W') key-pixel x reference-location similarity matrix G (one GEMM per reference frame,
  2*HW*C*H'W' FLOPs), instead of one GEMM per RoI point (2*n*49*C*H'W': 6.5x more for 300 RoIs at
  36x63); only the rows of the key pixels that some tap names are made (~89% of H*W for 300
  proposals on the parity clip);
* the 3x3 ``embed_network`` conv of a most-similar RoI map sums, over the 9 taps and the k points,
  softmax weight x (W_tap @ reference pixel): the 9 products W_tap @ R of every reference pixel are
  one 1x1 conv (C -> 9C) per frame, and each embedded point is a 9k-term weighted gather
  (``embedding_bag``). This replaces the conv over T*n 7x7 maps (T*n*49*9*C*C*2 = 1.0 TFLOP for 15
  frames x 300 RoIs) by T*H'W'*9*C*C*2 = 0.16 TFLOP, and by 0.01 TFLOP per frame when, as in SELSA,
  the reference frames stay the same from frame to frame: each map's key-frame-independent data
  (:class:`TRoIReference`, ~49 MB at 38 x 63 x 512) is prepared once and kept as long as the map
  itself lives. The key RoI maps are embedded the same way, from their RoIAlign taps.

The most-similar search is memory traffic, not FLOPs: per reference frame, ~15k similarity rows of
H'*W' values are summed from G's rows and ranked. A RoI point's 16 taps name ~6 distinct key pixels
on real proposals, so the repeated ones are merged first (:func:`merge_taps`); the rows are made
and ranked 256 points at a time, while they are in the L2 cache; and the top k of a row is taken
from its k best 64-column blocks (:func:`topk_blocked`) rather than by a partial sort of the row.

MMTracking's order of computation (the reference class) and this one round differently. Only
the *selections* can tell: the top-k most similar locations of a RoI point, when two similarities
are closer than float32 noise. Against a float64 ranking both orders pick another location for ~4% of
the RoI points on the parity checkpoint's random weights (docs/CONTRIBUTING.md, "Parity"), so no
float32 order settles them; the detections stay within the parity bar (``tests/test_parity.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from viddet.models.layers import ConvAct
from viddet.models.temporal_roi_align import TemporalRoIAlign
from viddet.runtime import CpuKernels
from viddet.speedups.detector import FastSingleRoIExtractor
from viddet.speedups.memo import TensorCache, per_tensor
from viddet.speedups.onednn import conv1x1_rows, matmul_nt
from viddet.speedups.roi_align import merge_taps, roi_align_taps

__all__ = ['FastTemporalRoIAlign', 'TRoIReference', 'prepare_reference', 'topk_blocked', 'SIMILARITY_CHUNK_POINTS']


SIMILARITY_CHUNK_POINTS = 256
"""RoI points whose similarity rows are made and ranked together: 256 x 2394 float32 (a 38 x 63
reference map) is 2.4 MB, about one core's L2 cache."""


def topk_blocked(sim: torch.Tensor, k: int, block: int = 64):
    """``torch.topk(sim, k, dim=1)`` (largest, sorted) for wide rows, from the k best blocks.

    The k largest values of a row lie in the k blocks of ``block`` consecutive columns with the
    largest maxima (each of them is the maximum of its block, or shares a block with a larger one),
    so a row's top k is the top k of those k blocks plus the columns after the last whole block.
    Finding them costs one vectorised max over the row and a top k of k blocks instead of a partial
    sort of the row: 0.6 against 1.2 ms for 256 x 2394 rows at one thread.

    Args:
        sim: (P, L) float; k: values per row (k <= L); block: columns per block (a power of two:
            ``amax`` over 126 columns takes 3.5x as long as over 128 on AVX-512).

    Returns:
        (values, indices), each (P, k), as ``torch.topk`` gives them: the same values, and the same
        indices except between equal values, whose order neither function specifies.
    """
    p, length = sim.shape
    nb = length // block
    if nb <= k:
        return torch.topk(sim, k, dim=1)
    whole = nb * block
    blocks = sim[:, :whole].view(p, nb, block)                             # a view, no copy
    _, best = blocks.amax(dim=2).topk(k, dim=1)                           # (P, k) block indices
    cand = blocks.gather(1, best[:, :, None].expand(p, k, block)).reshape(p, k * block)
    if whole < length:
        cand = torch.cat([cand, sim[:, whole:]], dim=1)
    values, j = cand.topk(k, dim=1)
    inblock = j < k * block
    jb = j.clamp(max=k * block - 1)
    idx = torch.where(inblock, best.gather(1, jb // block) * block + jb % block,
                      whole + j - k * block)
    return values, idx


@dataclass
class TRoIReference:
    """Key-frame-independent data of one reference map for :class:`FastTemporalRoIAlign`.

    Attributes:
        rows: (H'*W', C) float32 features, one row per location (y * W' + x).
        unit: (H'*W', C) the rows L2-normalised (no epsilon).
        proj: (H'*W'*9, C) row j*9 + o = ``embed_network`` weight at kernel tap o (dy*3 + dx)
            times row j (no bias); None where the embedding is not re-associated
            (:meth:`FastTemporalRoIAlign.reassociated`).
    """
    rows: torch.Tensor
    unit: torch.Tensor
    proj: Optional[torch.Tensor]


def prepare_reference(troi, ref: torch.Tensor, gemm: str = 'mkl') -> TRoIReference:
    """The :class:`TRoIReference` of one (1, C, H', W') map for the TemporalRoIAlign module ``troi``
    (its tap projections by one GEMM on ``gemm``, where ``troi.embed_network`` is a conv)."""
    c = ref.shape[1]
    rows = ref.float().permute(0, 2, 3, 1).reshape(-1, c)
    unit = rows / rows.norm(p=2, dim=1, keepdim=True)
    if not isinstance(troi.embed_network, ConvAct):
        return TRoIReference(rows.contiguous(), unit, None)
    conv = troi.embed_network.conv
    w_taps = conv.weight.permute(2, 3, 0, 1).reshape(9 * conv.out_channels, conv.in_channels)
    return TRoIReference(rows.contiguous(), unit, conv1x1_rows(ref, w_taps, gemm).view(-1, conv.out_channels))


class FastTemporalRoIAlign(FastSingleRoIExtractor, TemporalRoIAlign):
    """:class:`viddet.models.temporal_roi_align.TemporalRoIAlign` re-associated (module docstring)
    at inference with reference maps, attention blocks and a fixed sampling ratio; its RoIAlign by
    gathers (:class:`viddet.speedups.detector.FastSingleRoIExtractor`); the plain forward otherwise
    (autograd on, no reference maps). With an ``embed_network`` that is not the plain conv (an ONNX
    export's graph) only the most-similar search is re-associated (:meth:`reassociated`).

    Attributes:
        prepared: the :class:`TRoIReference` of each reference map, computed once per map tensor
            and weight version, kept while the map lives (a :class:`TensorCache`).
    """

    fast_attributes = ('prepared',)

    def __init__(self, plain: TemporalRoIAlign, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.prepared = TensorCache()

    def reference(self, ref: torch.Tensor) -> TRoIReference:
        """:func:`prepare_reference` of the (1, C, H', W') map ``ref``, from :attr:`prepared`."""
        return per_tensor(self.prepared, self, ref, lambda: prepare_reference(self, ref, self.kernels.gemm))

    def forward(self, feats: torch.Tensor, rois: torch.Tensor, ref_feats=None,
                roi_chunk_size: Optional[int] = None) -> torch.Tensor:
        """As :meth:`TemporalRoIAlign.forward` (same arguments and result, up to float rounding)."""
        if (ref_feats is None or torch.is_grad_enabled() or self.num_temporal_attention_blocks <= 0
                or self.sampling_ratio <= 0):
            return super().forward(feats, rois, ref_feats, roi_chunk_size)
        roi_feats = self.roi_align(feats, rois)
        maps = list(ref_feats) if isinstance(ref_feats, (list, tuple)) else list(ref_feats.split(1))
        self.check_inputs(feats, ref_feats if isinstance(ref_feats, torch.Tensor) else maps)
        if roi_feats.shape[0] == 0:
            return roi_feats
        fh, fw = maps[0].shape[-2:]
        if roi_chunk_size is None:
            roi_chunk_size = max(1, self.max_chunk_elements // (self.output_size ** 2 * fh * fw))
        if roi_chunk_size < 1:
            raise ValueError(f'roi_chunk_size must be >= 1, got {roi_chunk_size}')
        # float32 throughout (under autocast too: the gathers mix their operands' dtypes)
        with torch.autocast(feats.device.type, enabled=False):
            feats = feats.float()
            maps = [m.float() for m in maps]
            return self.aligned(feats, rois, roi_feats.float(), maps, roi_chunk_size,
                                cache_sized=feats.device.type == 'cpu')

    def aligned(self, feats: torch.Tensor, rois: torch.Tensor, roi_feats: torch.Tensor,
                maps: Sequence[torch.Tensor], roi_chunk_size: int, cache_sized: bool = True) -> torch.Tensor:
        """feats (1, C, H, W), rois (n, 5), roi_feats (n, C, S, S) = RoIAlign(feats, rois), maps: T
        reference maps (1, C, H', W') -> (n, C, S, S). ``cache_sized`` (CPU): similarity rows in
        L2-sized chunks, ranked by :func:`topk_blocked`; otherwise (a GPU, where each chunk is a few
        kernel launches and ``torch.topk`` is fast) ``roi_chunk_size`` RoIs at a time by
        ``torch.topk``; the same values either way."""
        n, c, s, _ = roi_feats.shape
        refs: List[TRoIReference] = [self.reference(m) for m in maps]
        taps = roi_align_taps(rois, feats.shape[2], feats.shape[3], s, self.spatial_scale,
                              self.sampling_ratio)                                # (P, 16) each
        roi_pts = roi_feats.permute(0, 2, 3, 1).reshape(n * s * s, c)             # (P, C)
        values, indices = self._most_similar(feats, taps, refs, roi_chunk_size * s * s, cache_sized)
        sel_w = (values / roi_pts.norm(p=2, dim=1, keepdim=True)).softmax(dim=2)  # (T, P, k), no epsilon
        if not self.reassociated():
            return self._aggregated_maps(roi_feats, refs, indices, sel_w, max(1, roi_chunk_size // len(refs)))
        weights = self._attention(feats, taps, refs, indices, sel_w, n, s)       # (1+T, P, G, 1)
        # 3. attention-weighted sum of the key RoI and the most-similar RoIs (raw features)
        g = self.num_temporal_attention_blocks
        out = roi_pts.view(-1, g, c // g) * weights[0]
        for f, ref in enumerate(refs):
            similar = F.embedding_bag(indices[f], ref.rows, per_sample_weights=sel_w[f], mode='sum')
            out.addcmul_(similar.view(-1, g, c // g), weights[1 + f])
        return out.view(n, s, s, c).permute(0, 3, 1, 2).contiguous()

    def reassociated(self) -> bool:
        """Whether step 2 is re-associated (module docstring): ``embed_network`` is the plain conv.
        Otherwise (an ONNX export's embedding graph, ``viddet.export.stages``, whose weights are not
        at hand) only step 1 is, and step 2 runs ``embed_network`` on the most-similar RoI maps."""
        return isinstance(self.embed_network, ConvAct)

    def _aggregated_maps(self, roi_feats: torch.Tensor, refs: Sequence[TRoIReference], indices: torch.Tensor,
                         sel_w: torch.Tensor, chunk: int) -> torch.Tensor:
        """Step 2 as :meth:`TemporalRoIAlign.temporal_attentional_feature_aggregation`, on the
        most-similar RoI maps (the softmax-weighted sums of the selected reference rows), ``chunk``
        RoIs at a time: roi_feats (n, C, S, S), indices and sel_w (T, P, k) -> (n, C, S, S)."""
        n, c, s, _ = roi_feats.shape
        outs = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            pts = slice(lo * s * s, hi * s * s)
            similar = torch.stack([F.embedding_bag(indices[f, pts], ref.rows, per_sample_weights=sel_w[f, pts],
                                                   mode='sum') for f, ref in enumerate(refs)])   # (T, p, C)
            similar = similar.view(len(refs), hi - lo, s, s, c).permute(0, 1, 4, 2, 3)
            outs.append(self.temporal_attentional_feature_aggregation(roi_feats[lo:hi].unsqueeze(0), similar))
        return torch.cat(outs)

    def _most_similar(self, feats: torch.Tensor, taps, refs: Sequence[TRoIReference], chunk: int,
                      cache_sized: bool):
        """Step 1: the k most similar locations of every RoI point in every reference map, by the
        similarities taps x (key pixels . unit reference locations), a chunk of points at a time
        (its similarity rows stay in the core's L2 cache). Returns (values, indices), each
        (T, P, k): the unnormalised similarities (dot products with the unit locations) and the
        locations."""
        taps_pos, taps_w = taps
        num, k = taps_pos.shape[0], self.num_most_similar_points
        flat_pos, flat_w, offsets = merge_taps(taps_pos, taps_w)
        # only the key pixels some tap names need a row of G (~89% of them for 300 real proposals)
        used, flat_pos = torch.unique(flat_pos, return_inverse=True)
        key_rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])[used]  # (U, C)
        starts = offsets.tolist()
        values = feats.new_empty(len(refs), num, k)
        indices = torch.empty(len(refs), num, k, dtype=torch.int64, device=feats.device)
        if cache_sized:
            chunk = max(1, min(chunk, SIMILARITY_CHUNK_POINTS))
        for f, ref in enumerate(refs):
            gram = matmul_nt(key_rows, ref.unit, gemm=self.kernels.gemm)         # (U, H'W')
            for lo in range(0, num, chunk):
                hi = min(num, lo + chunk)
                a, b = starts[lo], starts[hi]
                sim = F.embedding_bag(flat_pos[a:b], gram, offsets[lo:hi] - a,
                                      per_sample_weights=flat_w[a:b], mode='sum')  # (p, H'W')
                values[f, lo:hi], indices[f, lo:hi] = topk_blocked(sim, k) if cache_sized else \
                    torch.topk(sim, k, dim=1)
                del sim
            del gram
        return values, indices

    def _attention(self, feats: torch.Tensor, taps, refs: Sequence[TRoIReference], indices: torch.Tensor,
                   sel_w: torch.Tensor, n: int, s: int) -> torch.Tensor:
        """Step 2: ``embed_network`` of the key RoIs and of every most-similar map, tap by tap as
        gathers of W_o @ pixel, and the attention weights over the 1+T maps, (1+T, P, G, 1)."""
        taps_pos, taps_w = taps
        t, num, k = indices.shape
        pts, g, dev, dtype = s * s, self.num_temporal_attention_blocks, feats.device, sel_w.dtype
        py, px = torch.meshgrid(torch.arange(s, device=dev), torch.arange(s, device=dev), indexing='ij')
        dy, dx = torch.meshgrid(torch.arange(3, device=dev) - 1, torch.arange(3, device=dev) - 1, indexing='ij')
        qy = py.reshape(pts, 1) + dy.reshape(1, 9)
        qx = px.reshape(pts, 1) + dx.reshape(1, 9)
        inside = (qy >= 0) & (qy < s) & (qx >= 0) & (qx < s)                  # (S*S, 9), zero padding
        nbr = torch.where(inside, qy * s + qx, torch.zeros_like(qy))
        nbr = (torch.arange(n, device=dev).view(n, 1, 1) * pts + nbr).reshape(num, 9)
        inside = inside.to(dtype).repeat(n, 1).view(1, num, 9, 1)
        tap = torch.arange(9, device=dev).view(1, 1, 9, 1)
        bag = (indices[:, nbr] * 9 + tap).reshape(t, num, 9 * k)              # (T, P, 9k)
        bag_w = (sel_w[:, nbr] * inside).reshape(t, num, 9 * k)
        # the key RoIs' embedding by the same trick: RoIAlign taps of the key map x its tap
        # projections (9*16 gathers per point instead of a 3x3 conv over n 7x7 maps); the key map
        # is usually also the last reference map (SELSA), whose projections are then shared
        bias = self.embed_network.conv.bias
        key_bag = (taps_pos[nbr] * 9 + tap.view(1, 9, 1)).reshape(num, -1)    # (P, 9*16)
        key_w = (taps_w[nbr] * inside.view(num, 9, 1)).reshape(num, -1)
        key_pos, key_w, key_offsets = merge_taps(key_bag, key_w)
        key_embed = F.embedding_bag(key_pos, self.reference(feats).proj, key_offsets[:-1],
                                    per_sample_weights=key_w, mode='sum')
        if bias is not None:
            key_embed += bias
        c = key_embed.shape[1]
        key_embed = key_embed.view(num, g, c // g)
        dots = sel_w.new_empty(1 + t, num, g)                                 # <embed_t, embed_key> per block
        prod = sel_w.new_empty(num, g, c // g)
        torch.sum(torch.mul(key_embed, key_embed, out=prod), dim=2, out=dots[0])
        for f, ref in enumerate(refs):
            embed = F.embedding_bag(bag[f], ref.proj, per_sample_weights=bag_w[f], mode='sum')
            torch.sum(torch.mul(embed.view(num, g, c // g), key_embed, out=prod), dim=2, out=dots[1 + f])
            del embed
        if bias is not None:  # embed_t = gathers + bias
            dots[1:] += torch.linalg.vecdot(bias.view(1, g, c // g), key_embed)
        return (dots / float(c / g) ** 0.5).softmax(dim=0).unsqueeze(-1)
