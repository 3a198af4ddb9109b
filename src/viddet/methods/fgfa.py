"""FGFA, Flow-Guided Feature Aggregation (Zhu et al., ICCV 2017, §3); MMTracking
``mmtrack/models/vid/fgfa.py`` with its test protocol ``test_with_fix_stride``
(num_ref_imgs=30, frame_range=[-15, 15], stride 1).

Offline, frame t aggregates the 31-frame window [t-15, t+15], indices clipped to the video (so
the first / last frame is replicated at the edges): every window frame's features are warped to t
by FlowNet flow (the current frame's own slot, index 15, stays unwarped), then averaged with
per-pixel cosine-similarity softmax weights (EmbedAggregator). Each frame's backbone runs once per
video: features live in a cache that slides with the window.

Online (causal), the window is the last 15 frames and the current one, without replication.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from viddet.methods.single import SingleFrame
from viddet.methods.training import TrainSample, single_frame_losses
from viddet.models.aggregators import EmbedAggregator
from viddet.models.flownet import FlowNetSimple, flow_warp_feats, flow_warp_taps
from viddet.structures import Detections


class FGFA(SingleFrame):
    """Attributes ``detector``, ``motion`` (:class:`FlowNetSimple`), ``aggregator`` (:class:`EmbedAggregator`).

    Args:
        num_left, num_right: window half-widths in frames (15, 15).
        flow_chunk: FlowNet pairs per batch (bounds activation memory; at 1000x600 the 30 pairs
            take 4.7 / 5.1 / 5.4 / 5.8 s with chunks of 30 / 15 / 10 / 8 on 2 CPU cores, peaking at
            1.4 / 0.9 / 0.7 / 0.7 GB).
        embed_cache: compute the embedding conv of each frame's features once, as its 9 per-tap
            1x1 projections (44 MB per frame at 1000x600, ~1.4 GB for the 31-frame window), and
            embed every warped copy from them by bilinear gathers
            (:meth:`EmbedAggregator.tap_projections`); same results up to float summation order,
            ~30x fewer embedding FLOPs per frame. False runs the 31 embedding convs per frame as
            MMTracking does (less memory).
    """

    method = 'fgfa'

    def __init__(self, backbone: str = 'r50', num_classes: int = 30, num_left: int = 15,
                 num_right: int = 15, flow_chunk: int = 15, embed_cache: bool = True):
        super().__init__(backbone, num_classes)
        self.motion = FlowNetSimple()
        self.aggregator = EmbedAggregator()
        self.num_left, self.num_right, self.flow_chunk = num_left, num_right, flow_chunk
        self._feats: Dict[int, torch.Tensor] = {}
        self._imgs: Dict[int, torch.Tensor] = {}
        self.embed_cache = embed_cache
        self._proj: Dict[int, torch.Tensor] = {}

    def reset(self):
        self._feats, self._imgs, self._proj = {}, {}, {}

    def window(self, t: int, last: int, mode: str) -> List[int]:
        """Frame indices aggregated for frame ``t`` of a video whose last index is ``last``.

        offline: [clip(t + i, 0, last) for i in -num_left..num_right] (31 entries, edges replicated);
        online: [max(0, t - num_left), ..., t] (no replication).
        """
        if mode == 'online':
            return list(range(max(0, t - self.num_left), t + 1))
        return [min(max(t + i, 0), last) for i in range(-self.num_left, self.num_right + 1)]

    def _features(self, index: int, ctx) -> torch.Tensor:
        if index not in self._feats:
            frame = ctx.frame(index)
            with ctx.timer('backbone'):
                self._feats[index] = self.detector.extract_feat(frame.img)
            self._imgs[index] = frame.img
        return self._feats[index]

    def predict(self, frame, ctx) -> Detections:
        """Detections of ``frame``: the features of every frame of its window (:meth:`window`; each
        frame's backbone runs once per video and is cached while in a window) are warped to it by
        FlowNet flow, weighted by cosine similarity of their embeddings (softmax over the window) and
        summed, then the RPN and RoI head run on the aggregate (MMTracking ``FGFA.simple_test``).
        Offline reads up to ``num_right`` frames ahead through ``ctx``; online never does."""
        t = frame.index
        if ctx.mode == 'offline':
            ctx.frame(t + self.num_right)  # read ahead so the video's end (hence `last`) is known
            last = ctx.last_index if ctx.last_index is not None else t + self.num_right
        else:
            last = t
        window = self.window(t, last, ctx.mode)
        for i in sorted(set(window)):
            self._features(i, ctx)
        keep = set(window)
        self._feats = {i: f for i, f in self._feats.items() if i in keep}
        self._imgs = {i: f for i, f in self._imgs.items() if i in keep}
        self._proj = {i: f for i, f in self._proj.items() if i in keep}

        x = self._feats[t]
        # Warp each distinct source frame once. The current frame's own slot stays unwarped; its
        # replicated copies at the video's edges are warped by the self-flow, as in MMTracking.
        center = len(window) - 1 if ctx.mode == 'online' else self.num_left
        slots = [(j, i) for j, i in enumerate(window) if j != center]
        sources = sorted({i for _, i in slots})
        warped, taps = {}, {}
        use_taps = self.embed_cache and self.aggregator.supports_taps()
        if sources:
            with ctx.timer('flow'):
                src_imgs = torch.cat([self._imgs[i] for i in sources])
                flows = self.motion(frame.img.expand(len(sources), -1, -1, -1), src_imgs,
                                    frame.meta.img_shape, chunk_size=self.flow_chunk)
                src_feats = torch.cat([self._feats[i] for i in sources])
                for k, w in zip(sources, flow_warp_feats(src_feats, flows).split(1)):
                    warped[k] = w
                if use_taps:
                    pos, wts = flow_warp_taps(flows, x.shape[-2:])
                    taps = {k: (pos[n], wts[n]) for n, k in enumerate(sources)}
        with ctx.timer('aggregation'):
            stack = torch.cat([x if j == center else warped[i] for j, i in enumerate(window)])
            if use_taps:
                feats = self._aggregate_from_taps(t, window, center, taps, stack)
            else:
                feats = self.aggregator(x, stack)
        return self.detect(feats, frame.meta, ctx.timer)

    def _aggregate_from_taps(self, t, window, center, taps, stack) -> torch.Tensor:
        """EmbedAggregator output from cached per-frame tap projections (``embed_cache``)."""
        agg = self.aggregator
        size = stack.shape[-2:]
        for i in set(window):
            if i not in self._proj:
                self._proj[i] = agg.tap_projections(self._feats[i])[0]
        x_embed = agg.embed_sampled(self._proj[t], size)
        embeds = {i: agg.embed_sampled(self._proj[i], size, *taps[i]) for i in taps}
        ref_embed = torch.stack([x_embed if j == center else embeds[i] for j, i in enumerate(window)])
        return agg.aggregate_embedded(x_embed, ref_embed, stack)

    def _losses_one(self, sample: TrainSample, cfg) -> dict:
        """Training losses of one sample (MMTracking ``FGFA.forward_train``, REFERENCE.md §4.2).

        Key and R references (2, or 1 at a video boundary) go through the backbone together;
        each reference's features are warped to the key frame by FlowNet(key, ref) and the
        EmbedAggregator averages **only the warped references** (the key frame's own features
        serve as the similarity query but are not in the aggregated set).
        """
        self._check_refs(sample, 'FGFA')
        refs = sample.ref_imgs
        flows = self.motion(sample.img[None], refs, sample.img_shape)
        all_x = self.detector.extract_feat(torch.cat([sample.img[None], refs], dim=0))
        warped = flow_warp_feats(all_x[1:], flows)
        x = self.aggregator(all_x[:1], warped)
        return single_frame_losses(self, sample, cfg, x)
