"""FGFA's aggregation with the embedding conv factorized (:class:`FastEmbedAggregator`): the same
numbers as ``EmbedAggregator.aggregate_window`` (up to float summation order) with ~30x fewer
embedding FLOPs per frame.

FGFA embeds every warped copy of every window frame with a 3x3 conv (31 convs per frame, MMTracking
``EmbedAggregator``). With a single (linear) embedding conv, the embedding of a bilinearly warped map
is a fixed combination of per-pixel products: conv(warp(F))[p] = b + sum_o W_o warp(F)[p + o] =
b + sum_o sum_j beta_j(p + o) (W_o F)[pos_j(p + o)]. The k*k products W_o F of a frame (one 1x1
conv C -> k*k*C, the FLOPs of one embedding conv; 44 MB per frame at 1000x600) are computed once per
frame (:func:`tap_projections`), kept as long as the frame's features live, and every warped copy is
embedded from them by bilinear gathers (:func:`embed_sampled`, with the warp's taps from
:func:`flow_warp_taps`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from viddet.models.aggregators import EmbedAggregator
from viddet.models.fast import FastModule
from viddet.models.warp import feature_grid, warp_feats
from viddet.runtime import CpuKernels
from viddet.speedups.memo import TensorCache, per_tensor
from viddet.speedups.onednn import conv1x1_rows

__all__ = ['FastEmbedAggregator', 'tap_projections', 'flow_warp_taps', 'embed_sampled', 'aggregate_embedded',
           'supports_taps']


def supports_taps(aggregator) -> bool:
    """Whether the factorization applies to an ``EmbedAggregator``: a single stride-1 embedding
    conv with an odd kernel."""
    conv = aggregator.embed_convs[0].conv
    return len(aggregator.embed_convs) == 1 and conv.kernel_size[0] % 2 == 1 \
        and conv.stride == (1, 1) and conv.dilation == (1, 1)


def tap_projections(aggregator, feats: torch.Tensor, gemm: str = 'mkl') -> torch.Tensor:
    """(1, C, H, W) features -> (H*W*k*k, C): row ``p*k*k + o`` is ``W_o @ feats[:, p]``, with
    ``W_o`` the embedding conv's weight at kernel offset o = dy*k + dx (no bias); one GEMM by
    ``gemm`` (:func:`viddet.speedups.onednn.conv1x1_rows`)."""
    conv = aggregator.embed_convs[0].conv
    k, c = conv.kernel_size[0], conv.out_channels
    w = conv.weight.permute(2, 3, 0, 1).reshape(k * k * c, conv.in_channels)
    return conv1x1_rows(feats, w, gemm).view(-1, c)


def flow_warp_taps(feat_flow: torch.Tensor):
    """:func:`viddet.models.warp.warp_feats` as a sparse linear map: the bilinear taps of its
    ``grid_sample``.

    ``grid_sample(bilinear, padding_mode='border', align_corners=True)`` un-normalises
    ``ix = (gx + 1) / 2 * (W - 1)``, clamps it to [0, W - 1] (likewise y), and reads the 4 pixels
    around it with weights (x_se - ix)(y_se - iy), ... ; a corner outside the map (only when the
    coordinate is exactly W - 1 or H - 1, where its weight is 0) reads nothing.

    Args:
        feat_flow: (N, 2, H, W) flow on the grid of the feature maps it warps, in feature cells
            (:meth:`FlowNetSimple.feature_flow`, or ``resize_flow`` of a full-resolution flow).

    Returns:
        (pos, weight): (N, H*W, 4) int64 pixel indices y*W + x into a source map and float32
        weights, so that ``warp_feats(feats, feat_flow)[n, :, p] = sum_j weight[n, p, j] *
        feats[n, :, pos[n, p, j]]`` (up to float summation order).
    """
    h, w = int(feat_flow.shape[-2]), int(feat_flow.shape[-1])
    grid = feature_grid(feat_flow)
    ix = ((grid[..., 0] + 1) / 2) * (w - 1)
    iy = ((grid[..., 1] + 1) / 2) * (h - 1)
    ix = ix.clamp(0, w - 1)
    iy = iy.clamp(0, h - 1)
    x0, y0 = ix.floor(), iy.floor()
    x1, y1 = x0 + 1, y0 + 1
    wts = torch.stack([(x1 - ix) * (y1 - iy), (ix - x0) * (y1 - iy),
                       (x1 - ix) * (iy - y0), (ix - x0) * (iy - y0)], dim=-1)
    xs = torch.stack([x0, x1, x0, x1], dim=-1).long()
    ys = torch.stack([y0, y0, y1, y1], dim=-1).long()
    inside = (xs < w) & (ys < h)
    pos = torch.where(inside, ys * w + xs, torch.zeros_like(xs))
    wts = wts * inside.to(wts.dtype)
    n = feat_flow.shape[0]
    return pos.reshape(n, h * w, 4), wts.reshape(n, h * w, 4)


def embed_sampled(aggregator, proj: torch.Tensor, size, pos: Optional[torch.Tensor] = None,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Un-normalised embedding (conv output) of a map resampled with bilinear taps.

    Args:
        proj: (H*W*k*k, C) :func:`tap_projections` of one source frame.
        size: (H, W) of the maps.
        pos, weight: (H*W, J) taps of the resampling (:func:`flow_warp_taps`);
            None for the map itself (no resampling).

    Returns:
        (H*W, C) equal to ``embed_convs(resampled map)`` (before the L2 normalisation), rows
        y*W + x, up to float summation order.
    """
    conv = aggregator.embed_convs[0].conv
    k = conv.kernel_size[0]
    pad = conv.padding[0]
    h, w = int(size[0]), int(size[1])
    dev = proj.device
    yy, xx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing='ij')
    dy, dx = torch.meshgrid(torch.arange(k, device=dev), torch.arange(k, device=dev), indexing='ij')
    qy = yy.reshape(-1, 1) + dy.reshape(1, -1) - pad
    qx = xx.reshape(-1, 1) + dx.reshape(1, -1) - pad
    inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)                  # (HW, k*k)
    q = torch.where(inside, qy * w + qx, torch.zeros_like(qy))
    tap = torch.arange(k * k, device=dev).view(1, -1, 1)
    if pos is None:
        idx = q.unsqueeze(-1) * (k * k) + tap
        wts = inside.to(proj.dtype).unsqueeze(-1)
    else:
        idx = pos[q] * (k * k) + tap                                      # (HW, k*k, J)
        wts = weight[q] * inside.to(proj.dtype).unsqueeze(-1)
    out = F.embedding_bag(idx.reshape(h * w, -1), proj, per_sample_weights=wts.reshape(h * w, -1),
                          mode='sum')
    return out + conv.bias if conv.bias is not None else out


def aggregate_embedded(x_embed: torch.Tensor, ref_embed: Sequence[torch.Tensor],
                       ref_x: Sequence[torch.Tensor]) -> torch.Tensor:
    """``EmbedAggregator.forward`` from precomputed (un-normalised) embeddings.

    The cosine similarity is computed as ``<a, b> / (|a| |b|)`` rather than as the dot product of
    the normalised vectors (same value up to float rounding; no epsilon, as MMTracking: a zero
    embedding gives NaN either way), once per distinct tensor (FGFA's window repeats the first and
    last frames at a video's ends), and the maps are summed one at a time: nothing of the size of
    the whole window is stacked (0.30 -> 0.08 s for FGFA's 31 maps of 512 x 38 x 63 at one
    thread, plus the two ~150 MB concatenations the plain path needs).

    Args:
        x_embed: (H*W, C) embedding of the current frame.
        ref_embed: the N slots' embeddings, each (H*W, C) (a sequence, or an (N, H*W, C) tensor).
        ref_x: the N slots' maps, each (C, H, W) or (1, C, H, W) (a sequence, or an (N, C, H, W)
            tensor), in the order of ``ref_embed``.

    Returns:
        (1, C, H, W), as ``EmbedAggregator.forward``.
    """
    if len(ref_embed) != len(ref_x) or len(ref_x) == 0:
        raise ValueError(f'aggregate_embedded: {len(ref_embed)} embeddings for {len(ref_x)} maps')
    x_norm = x_embed.norm(p=2, dim=1)
    cosine: Dict[int, torch.Tensor] = {}
    logits = []
    for e in ref_embed:
        key = id(e)
        if key not in cosine:
            cosine[key] = (e * x_embed).sum(dim=1) / (e.norm(p=2, dim=1) * x_norm)   # (HW,)
        logits.append(cosine[key])
    h, w = ref_x[0].shape[-2:]
    weights = torch.stack(logits).softmax(dim=0).view(len(logits), 1, h, w)
    out = ref_x[0].reshape(-1, h, w) * weights[0]
    for i in range(1, len(logits)):
        out.addcmul_(ref_x[i].reshape(-1, h, w), weights[i])
    return out.unsqueeze(0)


class FastEmbedAggregator(FastModule, EmbedAggregator):
    """:class:`viddet.models.aggregators.EmbedAggregator` whose :meth:`aggregate_window` embeds
    every warped map from its frame's tap projections (module docstring) without autograd and for
    a single embedding conv (:func:`supports_taps`); the plain warping and convolutions otherwise.

    Attributes:
        projections: :func:`tap_projections` of each frame's features, computed once per feature
            tensor and weight version, kept while the features live (a :class:`TensorCache`).
    """

    fast_attributes = ('projections',)

    def __init__(self, plain: EmbedAggregator, kernels: CpuKernels):
        super().__init__(plain, kernels)
        self.projections = TensorCache()

    def projections_of(self, feats: torch.Tensor) -> torch.Tensor:
        """:func:`tap_projections` of ``feats`` (1, C, H, W), from :attr:`projections`."""
        return per_tensor(self.projections, self, feats, lambda: tap_projections(self, feats, self.kernels.gemm))

    def aggregate_window(self, t: int, window: Sequence[int], center: int, feats: Dict[int, torch.Tensor],
                         sources: Sequence[int], flows: Optional[torch.Tensor]) -> torch.Tensor:
        """The plain method's result (same arguments) with the factorized embedding."""
        if torch.is_grad_enabled() or not supports_taps(self):
            return super().aggregate_window(t, window, center, feats, sources, flows)
        x = feats[t]
        size = x.shape[-2:]
        warped: Dict[int, torch.Tensor] = {}
        embeds: Dict[int, torch.Tensor] = {}
        if sources:
            stacked = warp_feats(torch.cat([feats[i] for i in sources]), flows)
            warped = dict(zip(sources, stacked.split(1)))
            pos, wts = flow_warp_taps(flows)
            embeds = {i: embed_sampled(self, self.projections_of(feats[i]), size, pos[n], wts[n])
                      for n, i in enumerate(sources)}
        x_embed = embed_sampled(self, self.projections_of(x), size)
        maps = [x if j == center else warped[i] for j, i in enumerate(window)]
        embeddings = [x_embed if j == center else embeds[i] for j, i in enumerate(window)]
        return aggregate_embedded(x_embed, embeddings, maps)
