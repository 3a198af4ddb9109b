"""Temporal RoI Align (single feature level), numerically as MMTracking 0.14's ``TemporalRoIAlign``
(``mmtrack/models/roi_heads/roi_extractors/temporal_roi_align.py``); Gong et al., "Temporal ROI
Align for Video Object Recognition", AAAI 2021, §3 (Most Similar RoI Align, then Temporal
Attentional Feature Aggregation).

It keeps MMTracking's attribute names, so its state_dict keys equal the checkpoint keys under the
prefix ``detector.roi_head.bbox_roi_extractor.``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from viddet.models.detector import SingleRoIExtractor
from viddet.models.layers import ConvAct

__all__ = ['TemporalRoIAlign']


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

    ``viddet.speedups.troi.FastTemporalRoIAlign`` computes :meth:`forward` at inference by an
    equivalent re-associated computation; this class is the reference it is tested against.

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
                               ref_flat: Optional[torch.Tensor] = None,
                               given: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step 1 on a set of RoIs (MMTracking ``most_similar_roi_align``).

        Args:
            roi_feats: (r, C, h, w) key RoI features.
            ref_feats: (T, C, H, W) reference feature maps.
            ref_embed: optional precomputed (C, T*H*W) matrix of L2-normalised ``ref_feats``
                (channel-major, frame then row-major location), see :meth:`_ref_embedding`.
            ref_flat: optional precomputed (T, H*W, C) location-major copy of ``ref_feats``.
            given: optional (r*h*w, T, k) int64 locations (row-major on the reference map) to use
                instead of the top k wherever they are >= 0: the training-parity test gives
                MMTracking's own choices where the k-th and (k+1)-th similarities are float-tied.

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
        if given is not None:
            indices = torch.where(given >= 0, given, indices)
            values = sim.gather(2, indices)
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
                roi_chunk_size: Optional[int] = None,
                given_locations: Optional[torch.Tensor] = None) -> torch.Tensor:
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
            given_locations: (n*49, T, k) most-similar locations to use where >= 0 (see
                :meth:`most_similar_roi_align`; RoI points in RoI, row, column order).

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
        chunks = roi_feats.split(roi_chunk_size, dim=0)
        given = [None] * len(chunks) if given_locations is None else \
            given_locations.split(roi_chunk_size * self.output_size ** 2)
        for chunk, g in zip(chunks, given):
            ref_roi = self.most_similar_roi_align(chunk, ref_feats, ref_embed, ref_flat, g)
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
