"""SELSA + Temporal RoI Align (Gong et al., "Temporal ROI Align for Video Object Recognition",
AAAI 2021, §3); MMTracking ``configs/vid/temporal_roi_align/selsa_troialign_faster_rcnn_r50_dc5_7e_imagenetvid.py``.

SELSA's per-frame algorithm (:mod:`viddet.methods.selsa`: the same reference frames, the same
proposal attention in a box head with 3 shared fcs) with one change: the key frame's RoI features
are not its plain RoIAlign features but their Temporal RoI Align over the reference frames' feature
maps and its own (:class:`viddet.models.temporal_roi_align.TemporalRoIAlign`: for every RoI point, the
2 most similar locations of each map, then attention over the frames).
"""
from __future__ import annotations

import torch

from viddet.methods.faster_rcnn import kaiming_init
from viddet.methods.selsa import SELSA
from viddet.models.aggregators import SelsaBBoxHead
from viddet.models.detector import build_faster_rcnn
from viddet.models.temporal_roi_align import TemporalRoIAlign


class TRoI(SELSA):
    """Attribute ``detector`` (:class:`FasterRCNN` with a 3-fc :class:`SelsaBBoxHead` and a
    :class:`TemporalRoIAlign` RoI extractor). Arguments as :class:`SELSA`."""

    name = 'troi'
    title = 'SELSA + Temporal RoI Align'
    paper = 'Gong et al., Temporal ROI Align for Video Object Recognition, AAAI 2021'
    default_checkpoint = 'troi_r50'
    signature = ('detector.backbone.', 'detector.roi_head.bbox_head.aggregator.',
                 'detector.roi_head.bbox_roi_extractor.')
    num_shared_fcs = 3
    keeps_reference_maps = True

    @classmethod
    def build(cls, backbone: str = 'r50', num_classes: int = 30, num_refs: int = 14,
              ref_cache: bool = True) -> 'TRoI':
        detector = build_faster_rcnn(backbone, SelsaBBoxHead(num_classes, cls.num_shared_fcs), TemporalRoIAlign())
        return cls(detector, num_refs, ref_cache)

    def init_temporal_modules(self) -> None:
        """The Temporal RoI Align ``embed_network`` conv (mmcv ``ConvModule``: Kaiming normal)."""
        kaiming_init(self.detector.roi_head.bbox_roi_extractor.embed_network.conv)

    def key_rois(self, x: torch.Tensor, rois: torch.Tensor, roi_feats: torch.Tensor, ref_maps) -> torch.Tensor:
        """Temporal RoI Align of the key proposals over ``ref_maps`` (at test time the reference
        frames and the current frame; in training the sampled reference frames only)."""
        extractor = self.detector.roi_head.bbox_roi_extractor
        if self._trace is not None and self._trace.given_most_similar is not None:
            return extractor(x, rois, ref_maps, given_locations=self._trace.given_most_similar)
        return extractor(x, rois, ref_maps)
