"""Temporal feature aggregators: FGFA's EmbedAggregator, SELSA's SelsaAggregator, Temporal RoI Align.

Numerically as MMTracking 0.14 (``mmtrack/models/aggregators/`` and ``roi_heads/``):

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
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from viddet.models.detector import BBoxHead, SingleRoIExtractor
from viddet.models.layers import ConvAct

__all__ = ['EmbedAggregator', 'SelsaAggregator', 'SelsaRefProjections', 'SelsaBBoxHead', 'TemporalRoIAlign']


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
        return SelsaRefProjections(self.ref_fc_embed(ref_x), self.ref_fc(ref_x))

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
        q = self.fc_embed(x).view(n, g, d).permute(1, 0, 2)              # (G, n, d)
        k = refs.key.reshape(m, g, d).permute(1, 2, 0)                    # (G, d, m)
        weights = torch.bmm(q, k) / (d ** 0.5)                         # (G, n, m)
        weights = weights.softmax(dim=2)
        v = refs.value.reshape(m, g, d).permute(1, 0, 2)                  # (G, m, d)
        out = torch.bmm(weights, v).permute(1, 0, 2).contiguous()      # (n, G, d)
        return self.fc(out.view(n, c))

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


class SelsaBBoxHead(BBoxHead):
    """MMTracking ``SelsaBBoxHead``: the Shared2FC box head with a :class:`SelsaAggregator` after
    each shared fc, before its ReLU (Wu et al., ICCV 2019, §3.2; MMTracking
    ``mmtrack/models/roi_heads/bbox_heads/selsa_bbox_head.py``)::

        x = fc(x); ref = fc(ref); x = x + aggregator(x, ref); x, ref = relu(x), relu(ref)

    Keys: those of :class:`BBoxHead` plus ``aggregator.<i>.{fc_embed,ref_fc_embed,fc,ref_fc}``.

    Args:
        num_classes, num_shared_fcs: as :class:`BBoxHead` (2 fcs for SELSA, 3 for SELSA + TRoI).
        num_attention_blocks: heads of each aggregator (16).
    """

    def __init__(self, num_classes: int = 30, num_shared_fcs: int = 2, num_attention_blocks: int = 16,
                 fc_channels: int = 1024):
        super().__init__(num_classes=num_classes, num_shared_fcs=num_shared_fcs, fc_channels=fc_channels)
        self.aggregator = nn.ModuleList([SelsaAggregator(fc_channels, num_attention_blocks)
                                         for _ in range(num_shared_fcs)])

    def forward(self, x: torch.Tensor, ref_x: torch.Tensor):
        """Key RoI features (n, 512, 7, 7) attending to reference RoI features (m, 512, 7, 7)
        -> (cls_score (n, C + 1), bbox_pred (n, 4C))."""
        x, ref_x = x.flatten(1), ref_x.flatten(1)
        for fc, agg in zip(self.shared_fcs, self.aggregator):
            x, ref_x = fc(x), fc(ref_x)
            x = x + agg(x, ref_x)
            x, ref_x = F.relu(x), F.relu(ref_x)
        return self.fc_cls(x), self.fc_reg(x)

    # The reference side of the attention does not depend on the key frame, so a video method
    # computes each reference frame's projections once (:meth:`ref_projections`) and runs every key
    # frame on their concatenation (:meth:`forward_cached`); the result is :meth:`forward`'s.
    def ref_projections(self, ref_x: torch.Tensor, return_first_fc: bool = False):
        """Per-layer reference projections of reference RoI features (m, 512, 7, 7): a list of one
        :class:`SelsaRefProjections` per shared fc. With ``return_first_fc`` also the first fc's
        output (m, 1024) before ReLU, which :meth:`forward_cached` can reuse when the key RoIs are
        these same RoIs (SELSA's current frame is also one of its references)."""
        kv: List[SelsaRefProjections] = []
        ref_x = ref_x.flatten(1)
        first = None
        for fc, agg in zip(self.shared_fcs, self.aggregator):
            ref_x = fc(ref_x)
            first = ref_x if first is None else first
            kv.append(agg.project_refs(ref_x))
            ref_x = F.relu(ref_x)
        return (kv, first) if return_first_fc else kv

    def forward_cached(self, x: torch.Tensor, ref_kv: Sequence[SelsaRefProjections],
                       first_fc: Optional[torch.Tensor] = None):
        """:meth:`forward` from precomputed reference projections (one per shared fc).

        ``first_fc``: optional precomputed ``shared_fcs[0](x.flatten(1))``; the result is the same."""
        x = x.flatten(1)
        for i, (fc, agg, refs) in enumerate(zip(self.shared_fcs, self.aggregator, ref_kv)):
            x = first_fc if i == 0 and first_fc is not None else fc(x)
            x = F.relu(x + agg.forward_projected(x, refs))
        return self.fc_cls(x), self.fc_reg(x)


class TemporalRoIAlign(SingleRoIExtractor):
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

    ``viddet.speedups`` replaces :meth:`forward` at inference by an equivalent re-associated
    computation (``FactorizedTemporalRoIAlign``); this class is the reference it is tested against.

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
    """

    def __init__(self, out_channels: int = 512, output_size: int = 7,
                 spatial_scale: float = 1.0 / 16, sampling_ratio: int = 2,
                 num_most_similar_points: int = 2, num_temporal_attention_blocks: int = 4,
                 max_chunk_elements: int = 2 ** 26):
        super().__init__(output_size, spatial_scale, sampling_ratio)
        self.out_channels = out_channels
        self.num_most_similar_points = num_most_similar_points
        self.num_temporal_attention_blocks = num_temporal_attention_blocks
        self.max_chunk_elements = max_chunk_elements
        if num_temporal_attention_blocks > 0:
            if out_channels % num_temporal_attention_blocks:
                raise ValueError(f'out_channels {out_channels} is not divisible by '
                                 f'num_temporal_attention_blocks {num_temporal_attention_blocks}')
            self.embed_network = ConvAct(out_channels, out_channels, 3, padding=1, bias=True)

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
                ref_feats: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
                roi_chunk_size: Optional[int] = None) -> torch.Tensor:
        """RoI features of the key frame, temporally aggregated when ``ref_feats`` is given.

        Args:
            feats: (1, C, H, W) key-frame features (stride 16). Without ``ref_feats`` any batch
                size B works (plain RoIAlign).
            rois: (n, 5) [batch_index, x1, y1, x2, y2] in padded-image pixels.
            ref_feats: (T, C, H', W') reference feature maps (SELSA test: the 14 reference frames +
                the current frame, T = 15), or a list of T (1, C, H', W') maps, or None for plain
                RoIAlign (the reference proposals of the SELSA head).
            roi_chunk_size: RoIs per chunk; None chooses it from ``max_chunk_elements``. Chunking
                changes no result beyond float summation order.

        Returns:
            (n, C, 7, 7) RoI features.

        Raises:
            ValueError: if the key features do not have batch size 1 while ``ref_feats`` is given,
                or the shapes disagree.
        """
        roi_feats = self.roi_align(feats, rois)
        if ref_feats is None:
            return roi_feats
        ref_feats = self.check_inputs(feats, ref_feats).to(roi_feats.dtype)
        if roi_feats.shape[0] == 0:
            return roi_feats
        t, _, fh, fw = ref_feats.shape
        if roi_chunk_size is None:
            roi_chunk_size = max(1, self.max_chunk_elements // (self.output_size ** 2 * fh * fw * t))
        if roi_chunk_size < 1:
            raise ValueError(f'roi_chunk_size must be >= 1, got {roi_chunk_size}')
        ref_embed = self._ref_embedding(ref_feats)                          # (C, T*H*W)
        ref_flat = ref_feats.permute(0, 2, 3, 1).reshape(t, fh * fw, -1)    # (T, H*W, C)
        outs = []
        for chunk in roi_feats.split(roi_chunk_size, dim=0):
            ref_roi = self.most_similar_roi_align(chunk, ref_feats, ref_embed, ref_flat)
            outs.append(self.temporal_attentional_feature_aggregation(chunk.unsqueeze(0), ref_roi))
        return torch.cat(outs, dim=0)

    @staticmethod
    def check_inputs(feats: torch.Tensor, ref_feats) -> torch.Tensor:
        """The reference maps as one (T, C, H', W') tensor, after checking the shapes.

        Raises:
            ValueError: key features not (1, C, H, W), or reference maps of other channels/sizes.
        """
        if isinstance(ref_feats, (list, tuple)):
            if not ref_feats or any(m.dim() != 4 or m.shape[0] != 1 or m.shape[1:] != ref_feats[0].shape[1:]
                                    for m in ref_feats):
                raise ValueError('TemporalRoIAlign: ref_feats must be T maps of the same (1, C, H, W) size')
            ref_feats = torch.cat(list(ref_feats))
        if feats.dim() != 4 or feats.shape[0] != 1:
            raise ValueError(f'TemporalRoIAlign: key features must be (1, C, H, W) when ref_feats '
                             f'is given, got {tuple(feats.shape)}')
        if ref_feats.dim() != 4 or ref_feats.shape[1] != feats.shape[1]:
            raise ValueError(f'TemporalRoIAlign: ref_feats must be (T, {feats.shape[1]}, H, W), '
                             f'got {tuple(ref_feats.shape)}')
        return ref_feats
