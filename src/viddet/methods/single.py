"""Single-frame Faster R-CNN: the baseline every VID method is measured against.

Per frame: backbone + neck -> RPN (300 proposals) -> RoIAlign -> 2 fcs -> NMS. Equals MMTracking's
DFF with ``key_frame_interval=1`` (its parity reference) and mmdet's Faster R-CNN test
(``TwoStageDetector.simple_test``); Ren et al., "Faster R-CNN", NeurIPS 2015.
"""
from __future__ import annotations

from viddet.methods.base import VIDMethod
from viddet.structures import Detections


class SingleFrame(VIDMethod):
    """Per-frame detection, no temporal context. MMTracking publishes no single-frame VID model:
    the default checkpoint's detector part (SELSA R-50) is used, and any VID checkpoint's detector
    loads into it (with its own number of shared fcs)."""

    name = 'single'
    title = 'single-frame Faster R-CNN'
    paper = 'Ren et al., Faster R-CNN, NeurIPS 2015'
    default_checkpoint = 'selsa_r50'

    @classmethod
    def build(cls, backbone: str = 'r50', num_classes: int = 30, num_shared_fcs: int = 2) -> 'SingleFrame':
        """``num_shared_fcs``: 2, or 3 for the detector of a Temporal RoI Align checkpoint."""
        from viddet.models.detector import BBoxHead, build_faster_rcnn
        return cls(build_faster_rcnn(backbone, BBoxHead(num_classes=num_classes, num_shared_fcs=num_shared_fcs)))

    def predict(self, frame, ctx) -> Detections:
        with ctx.timer('backbone'):
            feats = self.detector.extract_feat(frame.img)
        return self.detector.detect(feats, frame.meta, ctx.timer)

    def losses(self, sample, cfg) -> dict:
        """The key frame alone (mmdet ``TwoStageDetector.forward_train``)."""
        return self.single_frame_losses(sample, cfg, self.detector.extract_feat(sample.img[None]))
