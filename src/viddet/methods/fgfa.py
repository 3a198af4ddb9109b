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
from torch import nn

from dataclasses import dataclass, field

from viddet.methods.base import MethodSettings, at_least
from viddet.methods.faster_rcnn import FasterRCNNMethod, kaiming_init
from viddet.models.aggregators import EmbedAggregator
from viddet.models.flownet import FlowNetSimple
from viddet.models.warp import flow_warp_feats
from viddet.structures import Detections


@dataclass
class FGFASettings(MethodSettings):
    """FGFA's inference settings (MMTracking's test-time reference sampler)."""
    num_left: int = field(default=15, metadata={'help': 'FGFA: frames before the current one in its window'})
    num_right: int = field(default=15, metadata={'help': 'FGFA: frames after it (offline mode)'})

    def __post_init__(self):
        at_least(self, 0, 'num_left', 'num_right')


class FGFA(FasterRCNNMethod):
    """Attributes ``detector``, ``motion`` (:class:`FlowNetSimple`), ``aggregator`` (:class:`EmbedAggregator`).

    Args:
        num_left, num_right: window half-widths in frames (15, 15).
        flow_chunk: FlowNet pairs per batch (bounds activation memory; at 1000x600 the 30 pairs
            take 4.7 / 5.1 / 5.4 / 5.8 s with chunks of 30 / 15 / 10 / 8 on 2 CPU cores, peaking at
            1.4 / 0.9 / 0.7 / 0.7 GB).
    """

    name = 'fgfa'
    title = 'FGFA'
    paper = 'Zhu et al., Flow-Guided Feature Aggregation for Video Object Detection, ICCV 2017'
    default_checkpoint = 'fgfa_r50'
    signature = ('detector.backbone.', 'motion.', 'aggregator.')
    has_flownet = True
    train_num_refs = 2
    Settings = FGFASettings

    def __init__(self, detector, motion: FlowNetSimple, aggregator: EmbedAggregator, num_left: int = 15,
                 num_right: int = 15, flow_chunk: int = 15):
        super().__init__(detector)
        self.motion = motion
        self.aggregator = aggregator
        if num_left < 0 or num_right < 0:
            raise ValueError(f'num_left and num_right must be >= 0, got {num_left} and {num_right}')
        self.num_left, self.num_right, self.flow_chunk = num_left, num_right, flow_chunk
        self.reset()

    @classmethod
    def build(cls, backbone: str = 'r50', num_classes: int = 30, num_left: int = 15,
              num_right: int = 15) -> 'FGFA':
        return cls(cls.detector_for(backbone, num_classes), FlowNetSimple(), EmbedAggregator(),
                   num_left, num_right)

    def init_temporal_modules(self) -> None:
        """The ``EmbedAggregator`` convs (mmcv ``ConvModule``: Kaiming normal), then FlowNet."""
        for m in self.aggregator.modules():
            if isinstance(m, nn.Conv2d):
                kaiming_init(m)
        super().init_temporal_modules()

    def read_ahead(self, mode: str) -> int:
        """Offline, frame t reads up to t + ``num_right``."""
        return self.num_right if mode == 'offline' else 0

    def reset(self):
        """Forgets the cached features and FlowNet inputs of the sliding window."""
        self._feats: Dict[int, torch.Tensor] = {}
        self._imgs: Dict[int, torch.Tensor] = {}   # FlowNet's prepared half of each frame (prepare_image)

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
            self._imgs[index] = self.motion.prepare_image(frame.img, frame.meta.img_shape)
        return self._feats[index]

    def predict(self, frame, ctx) -> Detections:
        """The features of every frame of the window (:meth:`window`; each frame's backbone runs once
        per video and is cached while in a window) are warped to this frame by FlowNet flow, weighted
        by the cosine similarity of their embeddings (softmax over the window) and summed, then the
        RPN and RoI head run on the aggregate (MMTracking ``FGFA.simple_test``). Offline reads up to
        ``num_right`` frames ahead through ``ctx``; online never does."""
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

        # Each distinct source frame is warped once. The current frame's own slot stays unwarped;
        # its replicated copies at the video's edges are warped by the self-flow, as in MMTracking.
        # FlowNet's input halves are prepared once per frame (MMTracking prepares the pairs anew
        # for every target frame, with the target's img_shape: the same for all frames of a video).
        center = len(window) - 1 if ctx.mode == 'online' else self.num_left
        sources = sorted({i for j, i in enumerate(window) if j != center})
        flows = None
        if sources:
            with ctx.timer('flow'):
                flows = self.motion.feature_flow_prepared(self._imgs[t], [self._imgs[i] for i in sources],
                                                          self._feats[t].shape[-2:], chunk_size=self.flow_chunk)
        with ctx.timer('aggregation'):
            feats = self.aggregator.aggregate_window(t, window, center, self._feats, sources, flows)
        return self.detector.detect(feats, frame.meta, ctx.timer)

    def losses(self, sample, cfg) -> dict:
        """MMTracking ``FGFA.forward_train``: key and R references (2, or 1 at a video boundary) go
        through the backbone together; each reference's features are warped to the key frame by
        FlowNet(key, ref) and the EmbedAggregator averages **only the warped references** (the key
        frame's own features are the similarity query but not in the aggregated set)."""
        refs = sample.ref_imgs
        flows = self.motion(sample.img[None], refs, sample.img_shape)
        all_x = self.detector.extract_feat(torch.cat([sample.img[None], refs], dim=0))
        warped = flow_warp_feats(all_x[1:], flows)
        x = self.aggregator(all_x[:1], warped)
        return self.single_frame_losses(sample, cfg, x)
