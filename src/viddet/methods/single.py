"""Single-frame Faster R-CNN: the baseline every VID method is measured against.

Per frame: backbone + neck -> RPN (300 proposals) -> RoIAlign -> 2 fcs -> NMS. Equals MMTracking's
DFF with ``key_frame_interval=1`` (its parity reference) and mmdet's Faster R-CNN test
(``TwoStageDetector.simple_test``); Ren et al., "Faster R-CNN", NeurIPS 2015.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from viddet.methods.faster_rcnn import FasterRCNNMethod
from viddet.structures import Detections

TEMPORAL_DETECTOR_PARTS = ('detector.roi_head.bbox_head.aggregator.', 'detector.roi_head.bbox_roi_extractor.')
"""State-dict prefixes that VID methods add inside the detector (SELSA's attention, Temporal RoI
Align's extractor): not part of the single-frame detector of their checkpoints."""


class SingleFrame(FasterRCNNMethod):
    """Per-frame detection, no temporal context. MMTracking publishes no single-frame VID model:
    the default checkpoint's detector part (SELSA R-50) is used, and any VID checkpoint's detector
    loads into it (with its own number of shared fcs)."""

    name = 'single'
    title = 'single-frame Faster R-CNN'
    paper = 'Ren et al., Faster R-CNN, NeurIPS 2015'
    default_checkpoint = 'selsa_r50'
    signature = ('detector.backbone.',)

    @classmethod
    def build(cls, backbone: str = 'r50', num_classes: int = 30, num_shared_fcs: int = 2) -> 'SingleFrame':
        """``num_shared_fcs``: 2, or 3 for the detector of a Temporal RoI Align checkpoint."""
        from viddet.models.detector import BBoxHead, build_faster_rcnn
        return cls(build_faster_rcnn(backbone, BBoxHead(num_classes=num_classes, num_shared_fcs=num_shared_fcs)))

    @classmethod
    def checkpoint_state(cls, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The detector part of any VID checkpoint: ``detector.*`` without the modules VID methods
        add inside it (:data:`TEMPORAL_DETECTOR_PARTS`); FlowNet and aggregators are dropped."""
        return {k: v for k, v in state.items()
                if k.startswith('detector.') and not k.startswith(TEMPORAL_DETECTOR_PARTS)}

    @classmethod
    def build_for_checkpoint(cls, backbone: str, num_classes: int, state: Mapping[str, torch.Tensor],
                             **settings) -> 'SingleFrame':
        """A detector with as many shared fcs as the checkpoint's box head has (3 for TRoI's)."""
        fcs = {k.split('.')[4] for k in state if k.startswith('detector.roi_head.bbox_head.shared_fcs.')}
        return cls.build(backbone, num_classes, num_shared_fcs=len(fcs) or cls.num_shared_fcs, **settings)

    def predict(self, frame, ctx) -> Detections:
        with ctx.timer('backbone'):
            feats = self.detector.extract_feat(frame.img)
        return self.detector.detect(feats, frame.meta, ctx.timer)

    def losses(self, sample, cfg) -> dict:
        """The key frame alone (mmdet ``TwoStageDetector.forward_train``)."""
        return self.single_frame_losses(sample, cfg, self.detector.extract_feat(sample.img[None]))
