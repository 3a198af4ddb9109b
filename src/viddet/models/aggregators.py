"""Temporal feature aggregators: FGFA's EmbedAggregator, SELSA's SelsaAggregator, Temporal RoI Align.

Numerically as MMTracking 0.14 (REFERENCE.md §4.1, §5.1, §6):

* :class:`EmbedAggregator` -- ``mmtrack/models/aggregators/embed_aggregator.py``; Zhu et al.,
  "Flow-Guided Feature Aggregation for Video Object Detection", ICCV 2017, §3.2 (adaptive weights
  from the cosine similarity of embedded features, normalised over frames).
* :class:`SelsaAggregator` -- ``mmtrack/models/aggregators/selsa_aggregator.py``; Wu et al.,
  "Sequence Level Semantics Aggregation for Video Object Detection", ICCV 2019, §3.2 (proposal
  features re-weighted by their semantic similarity to all reference proposals); MMTracking uses
  16 attention heads of 64 channels instead of the paper's single head.
* :class:`TemporalRoIAlign` -- ``mmtrack/models/roi_heads/roi_extractors/temporal_roi_align.py``;
  Gong et al., "Temporal ROI Align for Video Object Recognition", AAAI 2021, §3 (Most Similar RoI
  Align, then Temporal Attentional Feature Aggregation).

Every module keeps MMTracking's attribute names, so its state_dict keys equal the checkpoint keys
under the prefixes ``aggregator.`` (FGFA), ``detector.roi_head.bbox_head.aggregator.<i>.`` (SELSA)
and ``detector.roi_head.bbox_roi_extractor.`` (TRoI).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from viddet.models import fused
from viddet.models.flownet import ConvAct

__all__ = ['EmbedAggregator', 'SelsaAggregator', 'SelsaRefProjections', 'TemporalRoIAlign',
           'TRoIReference', 'roi_align_taps']


class EmbedAggregator(nn.Module):
    """FGFA's per-pixel adaptive aggregation of (warped) reference feature maps.

    MMTracking ``EmbedAggregator(num_convs=1, channels=512, kernel_size=3)``:

    * ``embed_convs``: ``num_convs`` convs (channels->channels, kernel k, padding (k-1)/2, bias).
      All but the last are followed by ReLU; the last has **no activation** (with num_convs=1, a
      single linear 3x3 conv). Keys ``embed_convs.<i>.conv.{weight,bias}``.
    * ``e = embed(x) / ||embed(x)||_2`` over channels, likewise for the refs, **without epsilon**
      (an all-zero embedding gives NaN, as in MMTracking).
    * ``w[n, h, w] = sum_c e_ref[n, c, h, w] * e[0, c, h, w]`` (cosine similarity), softmax over
      the N reference frames (dim 0) independently at each pixel.
    * ``out = sum_n w[n] * ref_x[n]``: the weights apply to the raw (un-embedded) features.

    Args:
        channels: feature channels C (512 for the DC5 neck).
        num_convs: number of embedding convs (1 in the FGFA config).
        kernel_size: embedding conv kernel size (3).
    """

    def __init__(self, channels: int = 512, num_convs: int = 1, kernel_size: int = 3):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f'EmbedAggregator needs at least one conv, got num_convs={num_convs}')
        self.embed_convs = nn.ModuleList([
            ConvAct(channels, channels, kernel_size, padding=(kernel_size - 1) // 2, bias=True,
                    act=None if i == num_convs - 1 else 'relu')
            for i in range(num_convs)])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W) L2-normalised embedding (no epsilon)."""
        for conv in self.embed_convs:
            x = conv(x)
        return x / x.norm(p=2, dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, ref_x: torch.Tensor) -> torch.Tensor:
        """Aggregates ``ref_x`` with weights from its similarity to ``x``.

        Args:
            x: (1, C, H, W) features of the current frame.
            ref_x: (N, C, H, W) features of the N frames to aggregate (warped to the current frame;
                at FGFA test time the N=31 window including the unwarped current frame).

        Returns:
            (1, C, H, W) aggregated features.

        Raises:
            ValueError: if x does not have batch size 1 or the shapes disagree.
        """
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f'EmbedAggregator: x must be (1, C, H, W), got {tuple(x.shape)}')
        if ref_x.dim() != 4 or ref_x.shape[1:] != x.shape[1:]:
            raise ValueError(f'EmbedAggregator: ref_x must be (N, {x.shape[1]}, {x.shape[2]}, '
                             f'{x.shape[3]}), got {tuple(ref_x.shape)}')
        weights = self.adaptive_weights(x, ref_x)
        return torch.sum(ref_x * weights, dim=0, keepdim=True)

    def adaptive_weights(self, x: torch.Tensor, ref_x: torch.Tensor) -> torch.Tensor:
        """The per-pixel aggregation weights of :meth:`forward`.

        Args:
            x: (1, C, H, W) current-frame features.
            ref_x: (N, C, H, W) features to aggregate.

        Returns:
            (N, 1, H, W) softmax over the N frames of the cosine similarity between the embeddings
            of ``ref_x[n]`` and ``x`` at each pixel (they sum to 1 over dim 0).
        """
        x_embed = self.embed(x)
        ref_embed = self.embed(ref_x)
        return torch.sum(ref_embed * x_embed, dim=1, keepdim=True).softmax(dim=0)

    # ---------------------------------------------------------------- factorized embedding (FGFA speed-up)
    # With a single (linear) embedding conv, the embedding of a bilinearly warped map is a fixed
    # combination of per-pixel products: conv(warp(F))[p] = b + sum_o W_o warp(F)[p + o]
    # = b + sum_o sum_j beta_j(p + o) (W_o F)[pos_j(p + o)]. The k*k products W_o F of a frame
    # (one 1x1 conv C -> k*k*C, the same FLOPs as one embedding conv) are computed once per frame
    # and reused by every window it is warped into, instead of one full conv per warped copy.

    def supports_taps(self) -> bool:
        """Whether :meth:`tap_projections` applies (a single embedding conv, odd kernel)."""
        conv = self.embed_convs[0].conv
        return len(self.embed_convs) == 1 and conv.kernel_size[0] % 2 == 1 \
            and conv.stride == (1, 1) and conv.dilation == (1, 1)

    def tap_projections(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) features -> (N, H*W*k*k, C): row ``p*k*k + o`` is ``W_o @ feats[:, p]``,
        with ``W_o`` the embedding conv's weight at kernel offset o = dy*k + dx (no bias).

        Raises:
            ValueError: if :meth:`supports_taps` is False.
        """
        if not self.supports_taps():
            raise ValueError('tap projections need a single stride-1 embedding conv with an odd kernel')
        conv = self.embed_convs[0].conv
        k, c = conv.kernel_size[0], conv.out_channels
        w = conv.weight.permute(2, 3, 0, 1).reshape(k * k * c, conv.in_channels)
        n, _, h, wd = feats.shape
        return _conv1x1_rows(feats, w).view(n, h * wd * k * k, c)

    def embed_sampled(self, proj: torch.Tensor, size, pos: Optional[torch.Tensor] = None,
                      weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Un-normalised embedding (conv output) of a map resampled with bilinear taps.

        Args:
            proj: (H*W*k*k, C) :meth:`tap_projections` of one source frame.
            size: (H, W) of the maps.
            pos, weight: (H*W, J) taps of the resampling (:func:`viddet.models.flownet.flow_warp_taps`);
                None for the map itself (no resampling).

        Returns:
            (H*W, C) equal to ``embed_convs(resampled map)`` (before the L2 normalisation), rows
            y*W + x, up to float summation order.
        """
        conv = self.embed_convs[0].conv
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

    def aggregate_embedded(self, x_embed: torch.Tensor, ref_embed: torch.Tensor,
                           ref_x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` from precomputed (un-normalised) embeddings.

        Args:
            x_embed: (H*W, C) embedding of the current frame.
            ref_embed: (N, H*W, C) embeddings of the N maps to aggregate.
            ref_x: (N, C, H, W) the maps themselves.

        Returns:
            (1, C, H, W), as :meth:`forward`.
        """
        n, c, h, w = ref_x.shape
        x_embed = x_embed / x_embed.norm(p=2, dim=1, keepdim=True)
        ref_embed = ref_embed / ref_embed.norm(p=2, dim=2, keepdim=True)
        weights = torch.sum(ref_embed * x_embed, dim=2).softmax(dim=0)        # (N, HW)
        return torch.sum(ref_x * weights.view(n, 1, h, w), dim=0, keepdim=True)


@dataclass
class SelsaRefProjections:
    """The reference-side projections of a :class:`SelsaAggregator`, computable once and cached.

    Attributes:
        key: (m, C) ``ref_fc_embed(ref_x)``.
        value: (m, C) ``ref_fc(ref_x)``.

    Rows are reference proposals; projections of disjoint reference sets can be concatenated with
    :meth:`cat` (e.g. the 14 cached SELSA reference frames + the current frame), which gives exactly
    the projections of the concatenated ``ref_x`` (the Linear layers act row by row).
    """
    key: torch.Tensor
    value: torch.Tensor

    def __len__(self) -> int:
        return self.key.shape[0]

    @staticmethod
    def cat(parts: Sequence['SelsaRefProjections']) -> 'SelsaRefProjections':
        """Concatenates projections along the proposal axis, in the given order."""
        return SelsaRefProjections(torch.cat([p.key for p in parts], dim=0),
                                   torch.cat([p.value for p in parts], dim=0))


class SelsaAggregator(nn.Module):
    """SELSA's multi-head attention of key proposals over reference proposals.

    MMTracking ``SelsaAggregator(in_channels=1024, num_attention_blocks=16)``. With G heads of
    d = C / G channels (16 x 64):

    * ``q = fc_embed(x)`` -> (G, n, d); ``k = ref_fc_embed(ref_x)`` -> (G, m, d);
      ``v = ref_fc(ref_x)`` -> (G, m, d) (channel c belongs to head c // d).
    * ``A = softmax_m(q k^T / sqrt(d))`` (sqrt(64) = 8), softmax over the m reference proposals.
    * ``out = fc(concat_heads(A v))`` -> (n, C).

    The SELSA head adds this to its fc output *before* the ReLU (that residual is the caller's).

    Attributes (keys): ``fc_embed``, ``ref_fc_embed``, ``fc``, ``ref_fc``: Linear(C, C) with bias.

    Args:
        in_channels: C (1024 = the shared fc width).
        num_attention_blocks: G (16).
    """

    def __init__(self, in_channels: int = 1024, num_attention_blocks: int = 16):
        super().__init__()
        if in_channels % num_attention_blocks:
            raise ValueError(f'in_channels {in_channels} is not divisible by '
                             f'num_attention_blocks {num_attention_blocks}')
        self.fc_embed = nn.Linear(in_channels, in_channels)
        self.ref_fc_embed = nn.Linear(in_channels, in_channels)
        self.fc = nn.Linear(in_channels, in_channels)
        self.ref_fc = nn.Linear(in_channels, in_channels)
        self.in_channels = in_channels
        self.num_attention_blocks = num_attention_blocks

    def project_refs(self, ref_x: torch.Tensor) -> SelsaRefProjections:
        """Reference-side projections, to compute once and reuse across key frames.

        Args:
            ref_x: (m, C) reference proposal features (the shared-fc output, before ReLU).

        Returns:
            :class:`SelsaRefProjections` with key = ``ref_fc_embed(ref_x)`` and value =
            ``ref_fc(ref_x)``, both (m, C).
        """
        return SelsaRefProjections(fused.linear(self.ref_fc_embed, ref_x), fused.linear(self.ref_fc, ref_x))

    def forward_projected(self, x: torch.Tensor, refs: SelsaRefProjections) -> torch.Tensor:
        """Same as :meth:`forward` with precomputed reference projections.

        Args:
            x: (n, C) key proposal features.
            refs: projections of the m reference proposals (:meth:`project_refs`, possibly
                concatenated with :meth:`SelsaRefProjections.cat`).

        Returns:
            (n, C) aggregated features (``fc`` output, no residual, no activation).
        """
        n, c = x.shape
        m = refs.key.shape[0]
        g = self.num_attention_blocks
        d = c // g
        q = fused.linear(self.fc_embed, x).view(n, g, d).permute(1, 0, 2)  # (G, n, d)
        k = refs.key.reshape(m, g, d).permute(1, 2, 0)                    # (G, d, m)
        weights = torch.bmm(q, k) / (d ** 0.5)                         # (G, n, m)
        weights = weights.softmax(dim=2)
        v = refs.value.reshape(m, g, d).permute(1, 0, 2)                  # (G, m, d)
        out = torch.bmm(weights, v).permute(1, 0, 2).contiguous()      # (n, G, d)
        return fused.linear(self.fc, out.view(n, c))

    def forward(self, x: torch.Tensor, ref_x: torch.Tensor) -> torch.Tensor:
        """Aggregates reference proposal features into the key proposals.

        Args:
            x: (n, C) key-frame proposal features.
            ref_x: (m, C) reference proposal features.

        Returns:
            (n, C) aggregated features.

        Raises:
            ValueError: if the inputs are not 2-D with C = in_channels.
        """
        if x.dim() != 2 or ref_x.dim() != 2 or x.shape[1] != self.in_channels \
                or ref_x.shape[1] != self.in_channels:
            raise ValueError(f'SelsaAggregator expects (n, {self.in_channels}) and '
                             f'(m, {self.in_channels}), got {tuple(x.shape)} and '
                             f'{tuple(ref_x.shape)}')
        return self.forward_projected(x, self.project_refs(ref_x))


def roi_align_taps(rois: torch.Tensor, height: int, width: int, output_size: int = 7,
                   spatial_scale: float = 1.0 / 16, sampling_ratio: int = 2):
    """RoIAlign (``aligned=True``, avg) written as a sparse linear map: its bilinear taps.

    torchvision's / mmcv's CPU kernel, step by step: RoI corners ``* spatial_scale - 0.5``; bins of
    ``roi_size / output_size``; ``sampling_ratio`` x ``sampling_ratio`` samples per bin at
    ``start + bin_index * bin + (i + 0.5) * bin / sampling_ratio``; a sample with y < -1, y > H,
    x < -1 or x > W contributes 0; otherwise coordinates are clamped at 0, the low corner is
    ``int(y)`` (and y = H-1 when ``int(y) >= H-1``), bilinear weights ``(1-ly)(1-lx)``, ... ; the
    bin value is the sum over samples divided by their number.

    Args:
        rois: (n, 5) [batch_index, x1, y1, x2, y2] in input pixels (the batch index is ignored:
            the taps index one feature map).
        height, width: feature map size H, W.

    Returns:
        (pos, weight): (n * S * S, 4 * r * r) int64 indices into the flattened H*W map and float32
        weights (already divided by r*r), S = output_size, r = sampling_ratio; output point
        (i, py, px) of ``roi_align`` equals ``sum_j weight[q, j] * feat[:, pos[q, j]]`` with
        q = (i * S + py) * S + px (invalid samples have weight 0 and position 0).
    """
    if sampling_ratio <= 0:
        raise ValueError('roi_align_taps needs a fixed sampling_ratio > 0')
    dtype = torch.float32
    r = rois.to(dtype)
    x1, y1 = r[:, 1] * spatial_scale - 0.5, r[:, 2] * spatial_scale - 0.5
    x2, y2 = r[:, 3] * spatial_scale - 0.5, r[:, 4] * spatial_scale - 0.5
    bin_w, bin_h = (x2 - x1) / output_size, (y2 - y1) / output_size
    grid = torch.arange(output_size, dtype=dtype, device=r.device)[None, :, None]
    sub = (torch.arange(sampling_ratio, dtype=dtype, device=r.device) + 0.5)[None, None, :]

    def axis(start, size_bin, size):
        v = start[:, None, None] + grid * size_bin[:, None, None] \
            + sub * size_bin[:, None, None] / sampling_ratio           # (n, S, r)
        valid = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0.0)
        low = v.to(torch.int64)
        top = low >= size - 1
        low = torch.where(top, torch.full_like(low, size - 1), low)
        high = torch.where(top, low, low + 1)
        frac = torch.where(top, torch.zeros_like(v), v - low.to(dtype))
        return valid, low, high, frac, 1.0 - frac

    vy, y_lo, y_hi, ly, hy = axis(y1, bin_h, height)
    vx, x_lo, x_hi, lx, hx = axis(x1, bin_w, width)
    ey = lambda a: a[:, :, None, :, None]  # noqa: E731  (n, Sy, 1, ry, 1)
    ex = lambda a: a[:, None, :, None, :]  # noqa: E731  (n, 1, Sx, 1, rx)
    valid = ey(vy) & ex(vx)
    w = torch.stack([ey(hy) * ex(hx), ey(hy) * ex(lx), ey(ly) * ex(hx), ey(ly) * ex(lx)], dim=-1)
    pos = torch.stack([ey(y_lo) * width + ex(x_lo), ey(y_lo) * width + ex(x_hi),
                       ey(y_hi) * width + ex(x_lo), ey(y_hi) * width + ex(x_hi)], dim=-1)
    w = w * valid[..., None].to(dtype) / float(sampling_ratio * sampling_ratio)
    pos = pos * valid[..., None].to(torch.int64)
    q = rois.shape[0] * output_size * output_size
    return pos.reshape(q, -1), w.reshape(q, -1)


def _conv1x1_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows(x) @ weight.T`` for x (1, C, H, W), weight (O, C): (H*W, O), row = y*W + x.

    Computed as a channels-last 1x1 convolution, which runs on oneDNN (about twice the fp32 GEMM
    throughput of ``torch.mm`` on this AMD CPU, same values up to summation order).
    """
    with torch.autocast(x.device.type, enabled=False):  # float32 (the gathers that follow need it)
        x = x.float().contiguous(memory_format=torch.channels_last)
        out = F.conv2d(x, weight.float()[:, :, None, None])
    return out.permute(0, 2, 3, 1).reshape(-1, weight.shape[0])


class TemporalRoIAlign(nn.Module):
    """Temporal RoI Align (single feature level), exactly as MMTracking's ``TemporalRoIAlign``.

    ``forward(feats, rois)`` is the plain RoIAlign (7x7, sampling_ratio 2, aligned=True, spatial
    scale 1/16; mmdet's ``SingleRoIExtractor`` with one level). With ``ref_feats``:

    1. Most Similar RoI Align: each of the 7x7 RoI feature vectors and every location of every
       reference map are L2-normalised over channels (no epsilon); for each RoI point and each
       reference frame the ``num_most_similar_points`` (2) locations of largest cosine similarity
       are picked (``topk``), their similarities are soft-maxed (over those k, no temperature) and
       the *raw* reference features at those locations are averaged with these weights ->
       (T, n, C, 7, 7).
    2. Temporal Attentional Feature Aggregation: the key RoI features are stacked *in front of*
       the T most-similar RoI features -> (1+T, n, C, 7, 7) (the key RoI takes part in the
       attention); ``embed_network`` (3x3 conv C->C, bias, no activation, zero-padded on each 7x7
       RoI map) embeds all of them; channels are split into ``num_temporal_attention_blocks`` (4)
       blocks of C/4 = 128; per block and per point the weight is
       ``<embed_t, embed_key> / sqrt(C/4)``, soft-maxed over the 1+T frames, and the raw features
       are summed with these weights -> (n, C, 7, 7). If num_temporal_attention_blocks <= 0 the
       1+T features are simply averaged (no embed_network).

    Both steps are independent per RoI, so RoIs are processed in chunks (``roi_chunk_size``) to
    bound memory; MMTracking builds the full (n*49, T*H*W) similarity matrix at once (~2 GB for
    300 RoIs, 15 frames of 38x63) and loops over frames, which gives the same numbers.

    Fast path (``factorized=True``, the default; :meth:`_forward_factorized`): both steps are
    linear in the feature maps, so they are re-associated, with the same results up to float
    summation order (checked against the direct path and a numpy loop in the tests):

    * a RoI point is a bilinear combination of 16 key-map pixels (:func:`roi_align_taps`), so its
      similarities to all reference locations are the same combination of the rows of the
      (H*W, H'*W') key-pixel x reference-location similarity matrix G (one GEMM per reference
      frame, 2*HW*C*H'W' FLOPs), instead of one GEMM per RoI point (2*n*49*C*H'W': 6.5x more for
      300 RoIs at 36x63);
    * the 3x3 ``embed_network`` conv of a most-similar RoI map sums, over the 9 taps and the k
      points, softmax weight x (W_tap @ reference pixel): the 9 products W_tap @ R of every
      reference pixel are one 1x1 conv (C -> 9C) per frame, and each embedded point is a 9k-term
      weighted gather (``embedding_bag``). This replaces the conv over T*n 7x7 maps
      (T*n*49*9*C*C*2 = 1.0 TFLOP for 15 frames x 300 RoIs) by T*H'W'*9*C*C*2 = 0.16 TFLOP
      (0.01 TFLOP per frame when the references' products are cached, :meth:`prepare_reference`).
      The key RoI maps are embedded the same way, from their RoIAlign taps (9 x 16 gathers).

    Args:
        out_channels: feature channels C (512).
        output_size: RoI output size (7).
        spatial_scale: 1 / feature stride (1/16).
        sampling_ratio: RoIAlign samples per bin side (2).
        num_most_similar_points: k of step 1 (2).
        num_temporal_attention_blocks: attention blocks of step 2 (4).
        max_chunk_elements: when ``roi_chunk_size`` is not given, RoIs per chunk are chosen so
            that the similarity matrix of a chunk has at most this many elements (default 2**26,
            256 MB in float32; the fast path holds one reference frame's similarities at a time,
            so 300 RoIs on a 38 x 63 map are one chunk).
        factorized: use the fast re-associated path (see above); False runs the direct
            computation (MMTracking's order of operations).
    """

    def __init__(self, out_channels: int = 512, output_size: int = 7,
                 spatial_scale: float = 1.0 / 16, sampling_ratio: int = 2,
                 num_most_similar_points: int = 2, num_temporal_attention_blocks: int = 4,
                 max_chunk_elements: int = 2 ** 26, factorized: bool = True):
        super().__init__()
        self.factorized = factorized
        self.out_channels = out_channels
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.num_most_similar_points = num_most_similar_points
        self.num_temporal_attention_blocks = num_temporal_attention_blocks
        self.max_chunk_elements = max_chunk_elements
        if num_temporal_attention_blocks > 0:
            if out_channels % num_temporal_attention_blocks:
                raise ValueError(f'out_channels {out_channels} is not divisible by '
                                 f'num_temporal_attention_blocks {num_temporal_attention_blocks}')
            self.embed_network = ConvAct(out_channels, out_channels, 3, padding=1, bias=True)

    def roi_align(self, feats: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Plain RoIAlign (mmcv ``RoIAlign(7, sampling_ratio=2, aligned=True)``, avg).

        Args:
            feats: (B, C, H, W) features at stride 1/spatial_scale.
            rois: (n, 5) [batch_index, x1, y1, x2, y2] in input-image pixels.

        Returns:
            (n, C, output_size, output_size).
        """
        return roi_align(feats, rois.to(feats.dtype), self.output_size,
                         spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
                         aligned=True)

    def most_similar_roi_align(self, roi_feats: torch.Tensor, ref_feats: torch.Tensor,
                               ref_embed: Optional[torch.Tensor] = None,
                               ref_flat: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step 1 on a set of RoIs (MMTracking ``most_similar_roi_align``).

        Args:
            roi_feats: (r, C, h, w) key RoI features.
            ref_feats: (T, C, H, W) reference feature maps.
            ref_embed: optional precomputed (C, T*H*W) matrix of L2-normalised ``ref_feats``
                (channel-major, frame then row-major location), see :meth:`_ref_embedding`.
            ref_flat: optional precomputed (T, H*W, C) location-major copy of ``ref_feats``.

        Returns:
            (T, r, C, h, w) most-similar RoI features.
        """
        r, c, h, w = roi_feats.shape
        t, _, fh, fw = ref_feats.shape
        if ref_embed is None:
            ref_embed = self._ref_embedding(ref_feats)
        if ref_flat is None:
            ref_flat = ref_feats.permute(0, 2, 3, 1).reshape(t, fh * fw, c)
        roi_embed = roi_feats / roi_feats.norm(p=2, dim=1, keepdim=True)
        roi_embed = roi_embed.permute(0, 2, 3, 1).reshape(r * h * w, c)      # (P, C)
        sim = roi_embed.mm(ref_embed).view(r * h * w, t, fh * fw)           # (P, T, HW)
        values, indices = sim.topk(k=self.num_most_similar_points, dim=2, largest=True)
        del sim
        values = values.softmax(dim=2)                                       # (P, T, k)
        frame_idx = torch.arange(t, device=ref_feats.device).view(1, t, 1)
        topk_feats = ref_flat[frame_idx, indices]                            # (P, T, k, C)
        out = (topk_feats * values.unsqueeze(-1)).sum(dim=2)                 # (P, T, C)
        return out.view(r, h, w, t, c).permute(3, 0, 4, 1, 2)                # (T, r, C, h, w)

    @staticmethod
    def _ref_embedding(ref_feats: torch.Tensor) -> torch.Tensor:
        """(T, C, H, W) -> (C, T*H*W) L2-normalised over C, no epsilon."""
        t, c, fh, fw = ref_feats.shape
        e = ref_feats / ref_feats.norm(p=2, dim=1, keepdim=True)
        return e.permute(1, 0, 2, 3).reshape(c, t * fh * fw)

    def temporal_attentional_feature_aggregation(self, x: torch.Tensor,
                                                 ref_x: torch.Tensor) -> torch.Tensor:
        """Step 2 (MMTracking ``temporal_attentional_feature_aggregation``).

        Args:
            x: (1, r, C, h, w) key RoI features.
            ref_x: (T, r, C, h, w) most-similar RoI features.

        Returns:
            (r, C, h, w) aggregated RoI features.
        """
        x = torch.cat((x, ref_x), dim=0)                                     # (1+T, r, C, h, w)
        n_img, r, c, h, w = x.shape
        if self.num_temporal_attention_blocks <= 0:
            return x.mean(dim=0)
        g = self.num_temporal_attention_blocks
        embed = self.embed_network(x.reshape(n_img * r, c, h, w))
        ce = embed.shape[1]
        embed = embed.view(n_img, r, g, ce // g, h, w)
        # (1+T, r, G, 1, h, w): per-block dot product with the key RoI's embedding.
        weights = torch.sum(embed * embed[:1], dim=3, keepdim=True) / (float(ce / g) ** 0.5)
        weights = weights.softmax(dim=0)
        # MMTracking expands the weights to all C channels before the softmax; the softmax of the
        # duplicated values is identical, so broadcasting over each block is the same computation.
        out = (x.view(n_img, r, g, c // g, h, w) * weights).sum(dim=0)
        return out.view(r, c, h, w)

    def forward(self, feats: torch.Tensor, rois: torch.Tensor,
                ref_feats: Optional[torch.Tensor] = None,
                roi_chunk_size: Optional[int] = None,
                references: Optional[Sequence[Optional['TRoIReference']]] = None) -> torch.Tensor:
        """RoI features of the key frame, temporally aggregated when ``ref_feats`` is given.

        Args:
            feats: (1, C, H, W) key-frame features (stride 16). Without ``ref_feats`` any batch
                size B works (plain RoIAlign).
            rois: (n, 5) [batch_index, x1, y1, x2, y2] in padded-image pixels.
            ref_feats: (T, C, H', W') reference feature maps (SELSA test: the 14 cached reference
                frames + the current frame, T = 15), or a list of T (1, C, H', W') maps (saves
                concatenating them), or None for plain RoIAlign (used for the reference proposals
                of the SELSA head).
            roi_chunk_size: RoIs per chunk for the temporal part; None chooses it from
                ``max_chunk_elements``. Chunking changes no result beyond float summation order.
            references: fast path only: optional T entries, :meth:`prepare_reference` of each
                ``ref_feats`` frame (or None), so that reference frames shared by many key frames
                (SELSA's cached references) are prepared once.

        Returns:
            (n, C, 7, 7) RoI features.

        Raises:
            ValueError: if the key features do not have batch size 1 while ``ref_feats`` is given,
                or the channel counts differ.
        """
        roi_feats = self.roi_align(feats, rois)
        if ref_feats is None:
            return roi_feats
        maps = None
        if isinstance(ref_feats, (list, tuple)):  # T maps (1, C, H', W'): no concatenated copy needed
            maps = [m.to(roi_feats.dtype) for m in ref_feats]
            if not maps or any(m.dim() != 4 or m.shape[0] != 1 or m.shape[1:] != maps[0].shape[1:] for m in maps):
                raise ValueError('TemporalRoIAlign: ref_feats must be T maps of the same (1, C, H, W) size')
            ref_feats = maps[0].expand(len(maps), -1, -1, -1)  # shape only (stride-0 view)
        if feats.shape[0] != 1:
            raise ValueError(f'TemporalRoIAlign: key features must be (1, C, H, W) when ref_feats '
                             f'is given, got {tuple(feats.shape)}')
        if ref_feats.dim() != 4 or ref_feats.shape[1] != feats.shape[1]:
            raise ValueError(f'TemporalRoIAlign: ref_feats must be (T, {feats.shape[1]}, H, W), '
                             f'got {tuple(ref_feats.shape)}')
        n = roi_feats.shape[0]
        if n == 0:
            return roi_feats
        t, _, fh, fw = ref_feats.shape
        points = self.output_size * self.output_size
        # The factorized path writes into preallocated outputs (no autograd): inference only.
        fast = (self.factorized and self.num_temporal_attention_blocks > 0 and self.sampling_ratio > 0
                and not torch.is_grad_enabled())
        if roi_chunk_size is None:
            per_roi = points * fh * fw * (1 if fast else t)
            roi_chunk_size = max(1, self.max_chunk_elements // per_roi)
        if roi_chunk_size < 1:
            raise ValueError(f'roi_chunk_size must be >= 1, got {roi_chunk_size}')
        if fast:
            if maps is None:
                maps = list(ref_feats.split(1))
            # float32 throughout (under autocast too: the gathers mix their operands' dtypes)
            with torch.autocast(feats.device.type, enabled=False):
                return self._forward_factorized(feats.float(), rois, roi_feats.float(),
                                                [m.float() for m in maps], roi_chunk_size, references)
        ref_feats = torch.cat(maps) if maps is not None else ref_feats.to(roi_feats.dtype)
        ref_embed = self._ref_embedding(ref_feats)                          # (C, T*H*W)
        ref_flat = ref_feats.permute(0, 2, 3, 1).reshape(t, fh * fw, -1)    # (T, H*W, C)
        outs = []
        for chunk in roi_feats.split(roi_chunk_size, dim=0):
            ref_roi = self.most_similar_roi_align(chunk, ref_feats, ref_embed, ref_flat)
            outs.append(self.temporal_attentional_feature_aggregation(chunk.unsqueeze(0), ref_roi))
        return torch.cat(outs, dim=0)

    def prepare_reference(self, ref: torch.Tensor) -> 'TRoIReference':
        """Everything the fast path needs from one reference map that does not depend on the key
        frame, to compute once per reference frame and pass to :meth:`forward` (``references``).

        Args:
            ref: (1, C, H', W') reference features.

        Returns:
            a :class:`TRoIReference` (about 10 x the size of ``ref``: 49 MB at 38 x 63 x 512).
        """
        c = ref.shape[1]
        rows = ref.float().permute(0, 2, 3, 1).reshape(-1, c)  # float32, as the fast path computes
        unit = rows / rows.norm(p=2, dim=1, keepdim=True)
        return TRoIReference(rows.contiguous(), unit, self._tap_projections(ref))

    def _tap_projections(self, ref: torch.Tensor) -> torch.Tensor:
        """(1, C, H', W') -> (H'W'*9, C): row j*9 + o = W_o @ ref pixel j (embed conv tap o)."""
        conv = self.embed_network.conv
        c = conv.out_channels
        w_taps = conv.weight.permute(2, 3, 0, 1).reshape(9 * c, conv.in_channels)
        return _conv1x1_rows(ref, w_taps).view(-1, c)

    def _forward_factorized(self, feats: torch.Tensor, rois: torch.Tensor, roi_feats: torch.Tensor,
                            maps: Sequence[torch.Tensor], roi_chunk_size: int,
                            references: Optional[Sequence[Optional['TRoIReference']]] = None) -> torch.Tensor:
        """The fast path of :meth:`forward` (class docstring); same arguments and result.

        feats (1, C, H, W), rois (n, 5), roi_feats (n, C, S, S) = RoIAlign(feats, rois),
        maps: T reference maps (1, C, H', W'), references: optional per-frame
        :meth:`prepare_reference` results (None entries are computed here, one frame at a time)
        -> (n, C, S, S).
        """
        n, c, s, _ = roi_feats.shape
        t, (_, _, fh, fw) = len(maps), maps[0].shape
        pts, k, g = s * s, self.num_most_similar_points, self.num_temporal_attention_blocks
        num, hw, d = n * pts, fh * fw, c // g                                 # P RoI points
        dev = roi_feats.device
        refs = list(references) if references is not None else [None] * t
        if len(refs) != t:
            raise ValueError(f'{len(refs)} prepared references for {t} reference maps')

        def rows_of(f):  # (H'W', C), a view when the map is channels-last
            return refs[f].rows if refs[f] is not None else maps[f].permute(0, 2, 3, 1).reshape(hw, c)
        taps_pos, taps_w = roi_align_taps(rois, feats.shape[2], feats.shape[3], s,
                                          self.spatial_scale, self.sampling_ratio)  # (P, 16)
        roi_pts = roi_feats.permute(0, 2, 3, 1).reshape(num, c)              # (P, C)

        # 1. most-similar points: similarities = taps x (key pixels . unit reference locations)
        values = roi_feats.new_empty(t, num, k)
        indices = torch.empty(t, num, k, dtype=torch.int64, device=dev)
        chunk = roi_chunk_size * pts
        for f in range(t):
            if refs[f] is not None:
                unit = refs[f].unit
            else:
                unit = rows_of(f)
                unit = unit / unit.norm(p=2, dim=1, keepdim=True)
            gram = _conv1x1_rows(feats, unit)                                 # (HW, H'W')
            for lo in range(0, num, chunk):
                hi = min(num, lo + chunk)
                sim = F.embedding_bag(taps_pos[lo:hi], gram, per_sample_weights=taps_w[lo:hi],
                                      mode='sum')                              # (p, H'W') unnormalised
                torch.topk(sim, k=k, dim=1, largest=True, out=(values[f, lo:hi], indices[f, lo:hi]))
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
        bias = self.embed_network.conv.bias
        key_ref = next((f for f in range(t) if maps[f] is feats), None)
        if key_ref is not None and refs[key_ref] is not None:
            key_proj = refs[key_ref].proj
        else:
            key_proj = self._tap_projections(feats)
        key_bag = (taps_pos[nbr] * 9 + tap.view(1, 9, 1)).reshape(num, -1)    # (P, 9*16)
        key_w = (taps_w[nbr] * inside.view(num, 9, 1)).reshape(num, -1)
        key_embed = F.embedding_bag(key_bag, key_proj, per_sample_weights=key_w, mode='sum')
        if bias is not None:
            key_embed += bias
        key_embed = key_embed.view(num, g, d)
        dots = roi_feats.new_empty(1 + t, num, g)                             # <embed_t, embed_key> per block
        prod = roi_feats.new_empty(num, g, d)
        torch.sum(torch.mul(key_embed, key_embed, out=prod), dim=2, out=dots[0])
        for f in range(t):
            if refs[f] is not None:
                proj = refs[f].proj
            else:
                proj = key_proj if f == key_ref else self._tap_projections(maps[f])
            embed = F.embedding_bag(bag[f], proj, per_sample_weights=bag_w[f], mode='sum')
            torch.sum(torch.mul(embed.view(num, g, d), key_embed, out=prod), dim=2, out=dots[1 + f])
            del proj, embed
        if bias is not None:  # embed_t = gathers + bias
            dots[1:] += torch.linalg.vecdot(bias.view(1, g, d), key_embed)
        weights = (dots / float(c / g) ** 0.5).softmax(dim=0).unsqueeze(-1)  # (1+T, P, G, 1)

        # 3. attention-weighted sum of the key RoI and the most-similar RoIs (raw features)
        out = roi_pts.view(num, g, d) * weights[0]
        for f in range(t):
            similar = F.embedding_bag(indices[f], rows_of(f), per_sample_weights=sel_w[f], mode='sum')
            out.addcmul_(similar.view(num, g, d), weights[1 + f])
        return out.view(n, s, s, c).permute(0, 3, 1, 2).contiguous()


@dataclass
class TRoIReference:
    """Key-frame-independent data of one reference frame for :class:`TemporalRoIAlign`'s fast path
    (:meth:`TemporalRoIAlign.prepare_reference`).

    Attributes:
        rows: (H'*W', C) the reference features, one row per location (y * W' + x).
        unit: (H'*W', C) the rows L2-normalised (no epsilon).
        proj: (H'*W'*9, C) row j*9 + o = ``embed_network`` weight at kernel tap o (dy*3 + dx)
            times row j (no bias).
    """
    rows: torch.Tensor
    unit: torch.Tensor
    proj: torch.Tensor
