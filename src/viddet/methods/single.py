"""Single-frame Faster R-CNN: the baseline every VID method is measured against.

Per frame: backbone + neck -> RPN (300 proposals) -> RoIAlign -> 2 fcs -> NMS. Equals MMTracking's
DFF with ``key_frame_interval=1`` (its parity reference) and mmdet's Faster R-CNN test.
"""
from __future__ import annotations

from torch import nn

from viddet.methods.training import TrainMixin, TrainSample, single_frame_losses
from viddet.models.detector import FasterRCNN, rois_from_proposals
from viddet.structures import Detections


class SingleFrame(TrainMixin, nn.Module):
    """Per-frame detection, no temporal context. Attribute ``detector`` (:class:`FasterRCNN`).

    Args:
        backbone: ``r50`` | ``r101`` | ``x101`` | ``mobilenetv2``.
        num_classes: 30 for ImageNet VID.
        num_shared_fcs: 2 (3 when loading the detector of a Temporal RoI Align checkpoint).
    """

    method = 'single'

    def __init__(self, backbone: str = 'r50', num_classes: int = 30, num_shared_fcs: int = 2, **detector_kwargs):
        super().__init__()
        self.detector = FasterRCNN(backbone, num_classes, num_shared_fcs=num_shared_fcs, **detector_kwargs)

    def reset(self):
        """Forgets per-video state (none for this method)."""

    def detect(self, feats, meta, timer) -> Detections:
        """RPN + RoI head + post-processing on one frame's (1, 512, h, w) features (any method's
        last step once the features are final)."""
        det = self.detector
        with timer('rpn'):
            proposals = det.rpn_head.proposals(feats, [meta.img_shape], det.rpn_test_cfg)
            rois = rois_from_proposals(proposals)
        with timer('roi_head'):
            cls_score, bbox_pred = det.roi_head.bbox_head(det.roi_head.roi_align(feats, rois))
        with timer('nms'):
            return det.roi_head.postprocess(rois, cls_score, bbox_pred, meta, det.rcnn_test_cfg)

    def predict(self, frame, ctx) -> Detections:
        """Detections of ``frame`` (a :class:`viddet.engine.video.VideoFrame`)."""
        with ctx.timer('backbone'):
            feats = self.detector.extract_feat(frame.img)
        return self.detect(feats, frame.meta, ctx.timer)

    def _losses_one(self, sample: TrainSample, cfg) -> dict:
        """Training losses of one sample: the key frame alone (mmdet ``TwoStageDetector.forward_train``)."""
        x = self.detector.extract_feat(sample.img[None])
        return single_frame_losses(self, sample, cfg, x)
