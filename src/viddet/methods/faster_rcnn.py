"""What the five Faster R-CNN VID methods (single, DFF, FGFA, SELSA, TRoI) share: the detector
(``self.detector``, a :class:`viddet.models.detector.FasterRCNN` assembled from parts), mmdet's
training settings and initialisation, and the RPN + RoI sampling of one training sample.

A one-stage detector family derives from :class:`viddet.methods.base.VIDMethod` directly.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Dict, Iterator, List, Optional

import torch
from torch import nn

from viddet.errors import VidDetError
from viddet.methods.base import VIDMethod
from viddet.models.detector import FasterRCNN, build_faster_rcnn, rois_from_proposals
from viddet.models.losses import (DetectorTrainConfig, rcnn_loss, rcnn_targets, rpn_forward_train,
                                  sample_rois)
from viddet.models.sampling import SamplingResult
from viddet.structures import TrainSample


@dataclass
class RoITrace:
    """What one training step's R-CNN stage was fed, recorded, and optionally decided from outside:
    the seam through which the training-parity test gives a step MMTracking's own sampled RoIs
    (``tests/test_train_parity.py``). Used with :meth:`FasterRCNNMethod.tracing`, one sample at a time.

    Attributes:
        given_sampling: RoIs (with their assigned gt) to train the R-CNN head on instead of the ones
            the step draws itself; None: the step's own draw.
        given_ref_proposals: SELSA / Temporal RoI Align: each reference frame's proposals, (k, 5)
            tensors (x1, y1, x2, y2, score) in resized pixels, to use instead of the step's own.
        given_most_similar: Temporal RoI Align: (n*49, T, k) int64 most-similar locations of the
            key RoIs' points on the reference maps, used where >= 0 instead of the step's own top k
            (:meth:`viddet.models.temporal_roi_align.TemporalRoIAlign.most_similar_roi_align`).
        proposals: recorded: (k, 5) the key frame's training proposals, as they enter the sampler.
        drawn: recorded: the RoIs the step drew from ``proposals`` (drawn even when given ones are
            used, so that the generator is consumed as in an ordinary step).
        ref_proposals: recorded: each reference frame's own test-RPN proposals (k, 5).
    """
    given_sampling: Optional[SamplingResult] = None
    given_ref_proposals: Optional[List[torch.Tensor]] = None
    given_most_similar: Optional[torch.Tensor] = None
    proposals: Optional[torch.Tensor] = None
    drawn: Optional[SamplingResult] = None
    ref_proposals: Optional[List[torch.Tensor]] = None


def xavier_init(m: nn.Module) -> None:
    """mmcv ``Xavier`` init: uniform weight, bias 0."""
    nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def normal_init(m: nn.Module, std: float) -> None:
    """mmcv ``Normal`` init: weight N(0, std), bias 0."""
    nn.init.normal_(m.weight, 0.0, std)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def kaiming_init(m: nn.Module, a: float = 0.0, nonlinearity: str = 'relu') -> None:
    """mmcv ``ConvModule``'s default init: Kaiming normal, ``mode='fan_out'``, bias 0."""
    nn.init.kaiming_normal_(m.weight, a=a, mode='fan_out', nonlinearity=nonlinearity)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def init_flownet(motion: nn.Module) -> None:
    """FlowNetSimple's convs as mmcv ``ConvModule`` initialises them (when no FlowNet weights are
    given): Kaiming normal ``fan_out``, leaky_relu with slope 0.1 for the activated convs."""
    for m in motion.modules():
        if isinstance(getattr(m, 'conv', None), (nn.Conv2d, nn.ConvTranspose2d)):
            leaky = isinstance(getattr(m, 'act', None), nn.LeakyReLU)
            kaiming_init(m.conv, a=0.1 if leaky else 0.0, nonlinearity='leaky_relu' if leaky else 'relu')


class FasterRCNNMethod(VIDMethod):
    """Base class of the Faster R-CNN DC5 methods.

    Args:
        detector: the method's Faster R-CNN (its box head / RoI extractor already the method's).
    """

    num_shared_fcs: ClassVar[int] = 2
    """Shared fcs of its box head (the detector part of its checkpoints)."""
    _trace: Optional[RoITrace] = None  # set by :meth:`tracing` only
    class_specific_prefixes = ('detector.roi_head.bbox_head.fc_cls.', 'detector.roi_head.bbox_head.fc_reg.')
    # mmdet ``BBoxHead``: ``fc_cls`` (C + 1 outputs), class-specific ``fc_reg`` (4 C outputs)

    def __init__(self, detector: FasterRCNN):
        super().__init__()
        self.detector = detector

    @classmethod
    def detector_for(cls, backbone: str, num_classes: int) -> FasterRCNN:
        """The plain Faster R-CNN most methods build on (Shared2FC box head, RoIAlign)."""
        return build_faster_rcnn(backbone, num_classes=num_classes)

    @classmethod
    def train_config(cls) -> DetectorTrainConfig:
        """MMTracking's ``train_cfg`` of this method (600 training proposals, 256 sampled RoIs)."""
        return DetectorTrainConfig()

    @property
    def num_classes(self) -> int:
        return self.detector.num_classes

    @property
    def backbone(self) -> nn.Module:
        return self.detector.backbone

    # ------------------------------------------------------------------ training set-up
    def configure_training(self, model_cfg) -> None:
        """``rpn_train_proposals`` / ``rcnn_samples`` override the train_cfg's proposal and RoI
        counts, ``backbone_frozen_stages`` the backbone's frozen stages, and ``flownet`` (``frozen``
        / ``zero``) freezes FlowNet (``zero``: its last layer zeroed, the flow exactly 0)."""
        tc = self.train_config()
        if model_cfg.rpn_train_proposals is not None:
            tc.rpn_proposal_max_per_img = model_cfg.rpn_train_proposals
        if model_cfg.rcnn_samples is not None:
            tc.rcnn_sampler.num = model_cfg.rcnn_samples
        self.train_cfg = tc
        if model_cfg.backbone_frozen_stages is not None:
            self.backbone.frozen_stages = model_cfg.backbone_frozen_stages
            self.backbone.train(self.backbone.training)  # applies the freezing
        if model_cfg.flownet != 'train':
            self.freeze_flownet(zero=model_cfg.flownet == 'zero')

    def freeze_flownet(self, zero: bool = False) -> None:
        """FlowNet parameters get ``requires_grad=False``; ``zero``: additionally the final
        ``predict_flow`` conv is zeroed, so the predicted flow is exactly 0 (features are warped by a
        zero flow; with MMTracking's warp that is the identity up to its (W-1)/W contraction).

        Raises:
            VidDetError: the method has no FlowNet.
        """
        if not self.has_flownet:
            raise VidDetError(f'method {self.name} has no FlowNet to freeze')
        if zero:
            with torch.no_grad():
                self.motion.predict_flow.conv.weight.zero_()
        for p in self.motion.parameters():
            p.requires_grad = False

    def init_weights(self) -> 'FasterRCNNMethod':
        """Initialises the parts that are trained from scratch as mmdet/mmcv 2.x/1.x ``init_cfg`` does.

        * neck ``ChannelMapper``: Xavier uniform, bias 0 (``init_cfg=Xavier(layer='Conv2d')``);
        * ``RPNHead`` convs: normal std 0.01, bias 0 (``init_cfg=Normal(layer='Conv2d', std=0.01)``);
        * ``Shared2FCBBoxHead``: shared fcs Xavier uniform, ``fc_cls`` normal std 0.01, ``fc_reg``
          normal std 0.001, biases 0 (``BBoxHead`` / ``ConvFCBBoxHead`` default ``init_cfg``);
        * the method's own modules (:meth:`init_temporal_modules`): FGFA's ``EmbedAggregator``, the
          Temporal RoI Align ``embed_network`` conv and FlowNetSimple (:func:`init_flownet`, when no
          FlowNet weights are given) with mmcv ``ConvModule``'s Kaiming normal;
        * ``SelsaAggregator`` linears keep PyTorch's default (MMTracking gives them no ``init_cfg``).

        The backbone is left alone (it gets ImageNet weights, or stays at PyTorch's default init).
        """
        det = self.detector
        for m in det.neck.modules():
            if isinstance(m, nn.Conv2d):
                xavier_init(m)
        for m in (det.rpn_head.rpn_conv, det.rpn_head.rpn_cls, det.rpn_head.rpn_reg):
            normal_init(m, 0.01)
        head = det.roi_head.bbox_head
        for m in head.shared_fcs:
            xavier_init(m)
        normal_init(head.fc_cls, 0.01)
        normal_init(head.fc_reg, 0.001)
        self.init_temporal_modules()
        return self

    def init_temporal_modules(self) -> None:
        """Initialises the method's own modules (after the detector's, in this order, so that a
        seeded initialisation draws the same numbers as mmdet's): FlowNet here, when the method
        has one; methods with other modules extend this."""
        if self.has_flownet:
            init_flownet(self.motion)

    # ------------------------------------------------------------------ training losses
    def rpn_and_sample(self, x: torch.Tensor, sample: TrainSample, cfg: DetectorTrainConfig, gen):
        """RPN losses on the key frame's features ``x`` (1, 512, h, w) and its sampled RoIs
        (n, 5) with their R-CNN targets (mmdet ``TwoStageDetector.forward_train`` up to the RoI head)."""
        losses, proposals = rpn_forward_train(self.detector, x, sample.img_shape, sample.gt_bboxes, cfg, gen)
        res = sample_rois(proposals, sample.gt_bboxes, sample.gt_labels, cfg, gen)
        if self._trace is not None:
            self._trace.proposals, self._trace.drawn = proposals, res
            if self._trace.given_sampling is not None:
                res = self._trace.given_sampling
        return losses, rois_from_proposals([res.bboxes]), rcnn_targets(res, self.num_classes)

    def traced_ref_proposals(self, own: List[torch.Tensor]) -> List[torch.Tensor]:
        """The reference frames' proposals a training step uses: ``own`` (recorded in the active
        :class:`RoITrace`), or the trace's ``given_ref_proposals``."""
        if self._trace is None:
            return own
        self._trace.ref_proposals = own
        given = self._trace.given_ref_proposals
        return own if given is None else given

    @contextmanager
    def tracing(self, trace: RoITrace) -> Iterator[RoITrace]:
        """Within the block, each training step records its proposals and RoIs into ``trace`` and
        uses the RoIs ``trace`` gives (see :class:`RoITrace`); one sample per step."""
        self._trace = trace
        try:
            yield trace
        finally:
            self._trace = None

    def single_frame_losses(self, sample: TrainSample, cfg: DetectorTrainConfig,
                            x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """RPN + R-CNN losses of the plain Faster R-CNN head on final features ``x`` (1, 512, h, w)."""
        losses, rois, targets = self.rpn_and_sample(x, sample, cfg, sample.generator())
        head = self.detector.roi_head
        cls_score, bbox_pred = head.bbox_head(head.roi_align(x, rois))
        losses.update(rcnn_loss(cls_score, bbox_pred, targets))
        return losses
