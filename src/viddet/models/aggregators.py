"""Temporal feature aggregators: FGFA's EmbedAggregator and SELSA's SelsaAggregator (Temporal RoI
Align: :mod:`viddet.models.temporal_roi_align`).

Numerically as MMTracking 0.14 (``mmtrack/models/aggregators/`` and ``roi_heads/``):

* :class:`EmbedAggregator` -- ``mmtrack/models/aggregators/embed_aggregator.py``; Zhu et al.,
  "Flow-Guided Feature Aggregation for Video Object Detection", ICCV 2017, §3.2 (adaptive weights
  from the cosine similarity of embedded features, normalised over frames).
* :class:`SelsaAggregator` -- ``mmtrack/models/aggregators/selsa_aggregator.py``; Wu et al.,
  "Sequence Level Semantics Aggregation for Video Object Detection", ICCV 2019, §3.2 (proposal
  features re-weighted by their semantic similarity to all reference proposals); MMTracking uses
  16 attention heads of 64 channels instead of the paper's single head.

Every module keeps MMTracking's attribute names, so its state_dict keys equal the checkpoint keys
under the prefixes ``aggregator.`` (FGFA) and ``detector.roi_head.bbox_head.aggregator.<i>.`` (SELSA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from viddet.models.detector import BBoxHead
from viddet.models.layers import ConvAct
from viddet.models.warp import warp_feats

__all__ = ['EmbedAggregator', 'SelsaAggregator', 'SelsaRefProjections', 'SelsaBBoxHead']


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

    def aggregate_window(self, t: int, window: Sequence[int], center: int, feats: Dict[int, torch.Tensor],
                         sources: Sequence[int], flows: Optional[torch.Tensor]) -> torch.Tensor:
        """FGFA's aggregation of a window of frames for frame ``t`` (Zhu et al., ICCV 2017, §3.2,
        eq. 1-2; MMTracking ``FGFA.simple_test``): every source frame's features are warped to ``t``
        by its flow (:func:`viddet.models.warp.warp_feats`), and :meth:`forward` averages the window
        slots with the similarity weights of :meth:`adaptive_weights`.

        Args:
            t: the current frame's index.
            window: frame index of each of the N window slots (``FGFA.window``).
            center: the slot of the current frame itself (its features are used unwarped).
            feats: (1, C, h, w) features of every frame in the window, by index.
            sources: the S distinct frames warped to ``t`` (every window frame but the centre slot's).
            flows: (S, 2, h, w) flow from ``t`` to each source on the feature grid, in feature cells
                (``FlowNetSimple.feature_flow``), in ``sources`` order (None when S = 0).

        Returns:
            (1, C, h, w) aggregated features of frame ``t``.
        """
        warped = {}
        if sources:
            stacked = warp_feats(torch.cat([feats[i] for i in sources]), flows)
            warped = dict(zip(sources, stacked.split(1)))
        stack = torch.cat([feats[t] if j == center else warped[i] for j, i in enumerate(window)])
        return self(feats[t], stack)


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
