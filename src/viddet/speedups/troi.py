"""Temporal RoI Align, re-associated: the same numbers as
:class:`viddet.models.aggregators.TemporalRoIAlign` (up to float summation order) at a fraction of
the FLOPs, for inference.

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

from viddet.speedups.memo import per_tensor
from viddet.speedups.roi_align import merge_taps, roi_align_taps
from viddet.speedups.onednn import conv1x1_rows, matmul_nt


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
    """Key-frame-independent data of one reference map for :func:`temporal_roi_align_forward`.

    Attributes:
        rows: (H'*W', C) float32 features, one row per location (y * W' + x).
        unit: (H'*W', C) the rows L2-normalised (no epsilon).
        proj: (H'*W'*9, C) row j*9 + o = ``embed_network`` weight at kernel tap o (dy*3 + dx)
            times row j (no bias).
    """
    rows: torch.Tensor
    unit: torch.Tensor
    proj: torch.Tensor


def prepare_reference(troi, ref: torch.Tensor) -> TRoIReference:
    """The :class:`TRoIReference` of one (1, C, H', W') map for the TemporalRoIAlign module ``troi``."""
    c = ref.shape[1]
    rows = ref.float().permute(0, 2, 3, 1).reshape(-1, c)
    unit = rows / rows.norm(p=2, dim=1, keepdim=True)
    conv = troi.embed_network.conv
    w_taps = conv.weight.permute(2, 3, 0, 1).reshape(9 * conv.out_channels, conv.in_channels)
    return TRoIReference(rows.contiguous(), unit, conv1x1_rows(ref, w_taps).view(-1, conv.out_channels))


def prepared(troi, ref: torch.Tensor) -> TRoIReference:
    """:func:`prepare_reference` of ``ref``, computed once per map tensor and weight version (the
    entry goes when the map goes)."""
    return per_tensor(troi, '_prepared', ref, lambda: prepare_reference(troi, ref))


def temporal_roi_align_forward(troi, feats: torch.Tensor, rois: torch.Tensor, ref_feats=None,
                               roi_chunk_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """:meth:`TemporalRoIAlign.forward` re-associated (module docstring); None where it does not
    apply (no reference maps, autograd on, no attention blocks or adaptive sampling), and the plain
    forward runs."""
    if (ref_feats is None or torch.is_grad_enabled() or troi.num_temporal_attention_blocks <= 0
            or troi.sampling_ratio <= 0):
        return None
    roi_feats = troi.roi_align(feats, rois)
    maps = list(ref_feats) if isinstance(ref_feats, (list, tuple)) else list(ref_feats.split(1))
    troi.check_inputs(feats, ref_feats if isinstance(ref_feats, torch.Tensor) else maps)
    if roi_feats.shape[0] == 0:
        return roi_feats
    fh, fw = maps[0].shape[-2:]
    if roi_chunk_size is None:
        roi_chunk_size = max(1, troi.max_chunk_elements // (troi.output_size ** 2 * fh * fw))
    if roi_chunk_size < 1:
        raise ValueError(f'roi_chunk_size must be >= 1, got {roi_chunk_size}')
    # float32 throughout (under autocast too: the gathers mix their operands' dtypes)
    with torch.autocast(feats.device.type, enabled=False):
        feats = feats.float()
        maps = [m.float() for m in maps]
        return _forward(troi, feats, rois, roi_feats.float(), maps, roi_chunk_size,
                        cache_sized=feats.device.type == 'cpu')


def _forward(troi, feats: torch.Tensor, rois: torch.Tensor, roi_feats: torch.Tensor,
             maps: Sequence[torch.Tensor], roi_chunk_size: int, cache_sized: bool = True) -> torch.Tensor:
    """feats (1, C, H, W), rois (n, 5), roi_feats (n, C, S, S) = RoIAlign(feats, rois), maps: T
    reference maps (1, C, H', W') -> (n, C, S, S). ``cache_sized`` (CPU): similarity rows in
    L2-sized chunks, ranked by :func:`topk_blocked`; otherwise (a GPU, where each chunk is a few
    kernel launches and ``torch.topk`` is fast) ``roi_chunk_size`` RoIs at a time by ``torch.topk``;
    the same values either way."""
    n, c, s, _ = roi_feats.shape
    t = len(maps)
    pts, k, g = s * s, troi.num_most_similar_points, troi.num_temporal_attention_blocks
    num, d = n * pts, c // g                                              # P RoI points
    dev = roi_feats.device
    refs: List[TRoIReference] = [prepared(troi, m) for m in maps]
    taps_pos, taps_w = roi_align_taps(rois, feats.shape[2], feats.shape[3], s,
                                      troi.spatial_scale, troi.sampling_ratio)  # (P, 16)
    roi_pts = roi_feats.permute(0, 2, 3, 1).reshape(num, c)              # (P, C)

    # 1. most-similar points: similarities = taps x (key pixels . unit reference locations),
    # a chunk of points at a time (its similarity rows stay in the core's L2 cache)
    flat_pos, flat_w, offsets = merge_taps(taps_pos, taps_w)
    # only the key pixels some tap names need a row of G (~89% of them for 300 real proposals)
    used, flat_pos = torch.unique(flat_pos, return_inverse=True)
    key_rows = feats.permute(0, 2, 3, 1).reshape(-1, c)[used]             # (U, C)
    starts = offsets.tolist()
    values = roi_feats.new_empty(t, num, k)
    indices = torch.empty(t, num, k, dtype=torch.int64, device=dev)
    chunk = roi_chunk_size * pts
    if cache_sized:
        chunk = max(1, min(chunk, SIMILARITY_CHUNK_POINTS))
    for f in range(t):
        gram = matmul_nt(key_rows, refs[f].unit)                              # (U, H'W')
        for lo in range(0, num, chunk):
            hi = min(num, lo + chunk)
            a, b = starts[lo], starts[hi]
            sim = F.embedding_bag(flat_pos[a:b], gram, offsets[lo:hi] - a,
                                  per_sample_weights=flat_w[a:b], mode='sum')  # (p, H'W') unnormalised
            values[f, lo:hi], indices[f, lo:hi] = topk_blocked(sim, k) if cache_sized else \
                torch.topk(sim, k, dim=1)
            del sim
        del gram
    roi_norm = roi_pts.norm(p=2, dim=1, keepdim=True)                     # no epsilon
    sel_w = (values / roi_norm).softmax(dim=2)                           # (T, P, k)

    # 2. embed_network of every most-similar map, tap by tap: gathers of W_o @ ref pixel
    py, px = torch.meshgrid(torch.arange(s, device=dev), torch.arange(s, device=dev), indexing='ij')
    dy, dx = torch.meshgrid(torch.arange(3, device=dev) - 1, torch.arange(3, device=dev) - 1, indexing='ij')
    qy = py.reshape(pts, 1) + dy.reshape(1, 9)
    qx = px.reshape(pts, 1) + dx.reshape(1, 9)
    inside = (qy >= 0) & (qy < s) & (qx >= 0) & (qx < s)                  # (S*S, 9), zero padding
    nbr = torch.where(inside, qy * s + qx, torch.zeros_like(qy))
    nbr = (torch.arange(n, device=dev).view(n, 1, 1) * pts + nbr).reshape(num, 9)
    inside = inside.to(roi_feats.dtype).repeat(n, 1).view(1, num, 9, 1)
    tap = torch.arange(9, device=dev).view(1, 1, 9, 1)
    bag = (indices[:, nbr] * 9 + tap).reshape(t, num, 9 * k)              # (T, P, 9k)
    bag_w = (sel_w[:, nbr] * inside).reshape(t, num, 9 * k)
    # the key RoIs' embedding by the same trick: RoIAlign taps of the key map x its tap
    # projections (9*16 gathers per point instead of a 3x3 conv over n 7x7 maps); the key map
    # is usually also the last reference map (SELSA), whose projections are then shared
    bias = troi.embed_network.conv.bias
    key_proj = prepared(troi, feats).proj
    key_bag = (taps_pos[nbr] * 9 + tap.view(1, 9, 1)).reshape(num, -1)    # (P, 9*16)
    key_w = (taps_w[nbr] * inside.view(num, 9, 1)).reshape(num, -1)
    key_pos, key_w, key_offsets = merge_taps(key_bag, key_w)
    key_embed = F.embedding_bag(key_pos, key_proj, key_offsets[:-1], per_sample_weights=key_w,
                                mode='sum')
    if bias is not None:
        key_embed += bias
    key_embed = key_embed.view(num, g, d)
    dots = roi_feats.new_empty(1 + t, num, g)                             # <embed_t, embed_key> per block
    prod = roi_feats.new_empty(num, g, d)
    torch.sum(torch.mul(key_embed, key_embed, out=prod), dim=2, out=dots[0])
    for f in range(t):
        embed = F.embedding_bag(bag[f], refs[f].proj, per_sample_weights=bag_w[f], mode='sum')
        torch.sum(torch.mul(embed.view(num, g, d), key_embed, out=prod), dim=2, out=dots[1 + f])
        del embed
    if bias is not None:  # embed_t = gathers + bias
        dots[1:] += torch.linalg.vecdot(bias.view(1, g, d), key_embed)
    weights = (dots / float(c / g) ** 0.5).softmax(dim=0).unsqueeze(-1)  # (1+T, P, G, 1)

    # 3. attention-weighted sum of the key RoI and the most-similar RoIs (raw features)
    out = roi_pts.view(num, g, d) * weights[0]
    for f in range(t):
        similar = F.embedding_bag(indices[f], refs[f].rows, per_sample_weights=sel_w[f], mode='sum')
        out.addcmul_(similar.view(num, g, d), weights[1 + f])
    return out.view(n, s, s, c).permute(0, 3, 1, 2).contiguous()


