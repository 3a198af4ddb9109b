"""The contract every VID method fulfils: the facts it declares and the two things it computes.

A method is a class derived from :class:`VIDMethod`. It *has* a detector (``self.detector``, a
:class:`viddet.models.detector.FasterRCNN` assembled from parts) and whatever temporal modules its
paper adds (``motion`` = FlowNet, ``aggregator``), under the attribute names of MMTracking's
models so that checkpoints load unchanged. It declares, as class attributes, everything the rest of
viddet needs to know about it — the CLI, the checkpoint loader, the config checks, the trainer and
the benchmark read these facts instead of comparing method names:

==========================  ================================================================
``name``                    short name in configs, the CLI and checkpoints (``dff``)
``title``                   display name (``DFF``)
``paper``                   the paper it implements
``default_checkpoint``      the model-zoo checkpoint ``--checkpoint`` defaults to
``signature``               state-dict key prefixes (besides ``detector.``) that identify its
                            checkpoints; the most specific matching method wins
``num_shared_fcs``          shared fcs of its box head (the detector part of its checkpoints)
``has_flownet``             whether it has a FlowNet (``motion``) to initialise / freeze
``train_num_refs``          reference frames per training sample (MMTracking ``num_ref_imgs``)
``train_ref_sampler``       the reference sampler of its MMTracking training config
``test_settings``           the :class:`viddet.config.TestConfig` fields its inference reads
==========================  ================================================================

and :meth:`VIDMethod.train_config` gives its MMTracking ``train_cfg``. It computes:

* :meth:`VIDMethod.predict`: the detections of one frame of a video, given a context through which
  it may look at other frames (:class:`viddet.engine.video.VideoContext`); :meth:`reset` forgets
  the per-video state.
* :meth:`VIDMethod.losses`: the training losses of one :class:`TrainSample`
  (MMTracking's ``forward_train``); :meth:`VIDMethod.forward_train` averages them over a batch.

Adding a method is one new file in this folder and one entry in ``METHODS`` in
``viddet/methods/__init__.py`` (see ``docs/CONTRIBUTING.md``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from viddet.models.detector import FasterRCNN, build_faster_rcnn, rois_from_proposals
from viddet.models.losses import DetectorTrainConfig, rcnn_loss, rcnn_targets, rpn_forward_train, sample_rois
from viddet.structures import Detections, TrainSample


class VIDMethod(nn.Module):
    """Base class of the VID methods (see the module docstring for the contract).

    Args:
        detector: the method's Faster R-CNN (its box head / RoI extractor already the method's).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ''
    default_checkpoint: ClassVar[str]
    signature: ClassVar[Tuple[str, ...]] = ()
    num_shared_fcs: ClassVar[int] = 2
    has_flownet: ClassVar[bool] = False
    train_num_refs: ClassVar[int] = 0
    train_ref_sampler: ClassVar[Optional[Mapping[str, Any]]] = None
    test_settings: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, detector: FasterRCNN):
        super().__init__()
        self.detector = detector

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, backbone: str = 'r50', num_classes: int = 30, **settings) -> 'VIDMethod':
        """A new, randomly initialised model of this method.

        Args:
            backbone: a name of :data:`viddet.models.backbones.BACKBONES`.
            num_classes: object classes (30 for ImageNet VID).
            settings: the method's test settings (the names in ``test_settings``), e.g.
                ``key_frame_interval=5`` for DFF.

        Raises:
            TypeError: a setting the method does not have.
            VidDetError: unknown backbone.
        """
        raise NotImplementedError

    @classmethod
    def detector_for(cls, backbone: str, num_classes: int) -> FasterRCNN:
        """The plain Faster R-CNN most methods build on (Shared2FC box head, RoIAlign)."""
        return build_faster_rcnn(backbone, num_classes=num_classes)

    @classmethod
    def train_config(cls) -> DetectorTrainConfig:
        """MMTracking's ``train_cfg`` of this method (600 training proposals, 256 sampled RoIs)."""
        return DetectorTrainConfig()

    @classmethod
    def settings_of(cls, test_config) -> Dict[str, Any]:
        """The keyword arguments of :meth:`build` taken from a :class:`viddet.config.TestConfig`."""
        return {k: getattr(test_config, k) for k in cls.test_settings}

    @property
    def num_classes(self) -> int:
        return self.detector.num_classes

    # ------------------------------------------------------------------ inference
    def reset(self) -> None:
        """Forgets all per-video state (called before and after every video)."""

    def predict(self, frame, ctx) -> Detections:
        """Detections of ``frame`` (a :class:`viddet.engine.video.VideoFrame`) in original-image
        pixels; ``ctx`` (:class:`viddet.engine.video.VideoContext`) gives the mode, other frames of
        the video and the stage timer."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    @property
    def train_cfg(self) -> DetectorTrainConfig:
        """The training settings in use (default :meth:`train_config`; the trainer may set them)."""
        cfg = self.__dict__.get('_train_cfg')
        return cfg if cfg is not None else self.train_config()

    @train_cfg.setter
    def train_cfg(self, cfg: DetectorTrainConfig):
        self.__dict__['_train_cfg'] = cfg

    def losses(self, sample: TrainSample, cfg: DetectorTrainConfig) -> Dict[str, torch.Tensor]:
        """Training losses of one sample (MMTracking ``forward_train`` of this method)."""
        raise NotImplementedError

    def forward_train(self, batch: Union[TrainSample, Sequence[TrainSample]]) -> Dict[str, torch.Tensor]:
        """Training losses of a batch, the mean over its samples of each sample's mmdet losses.

        MMTracking trains every VID method with one key image per GPU and lets DDP average the
        gradients; computing each sample's losses on its own and averaging keeps that unit, so a
        batch of B samples, k accumulated batches or W processes give the gradient of W*k*B GPUs.

        Args:
            batch: one :class:`TrainSample` or a list of them (each on the model's device).

        Returns:
            {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'acc'}: scalar tensors; the
            total loss is :func:`viddet.models.losses.sum_losses` of it ('acc' excluded).

        Raises:
            ValueError: empty batch or a sample without the reference frames the method needs.
        """
        samples = [batch] if isinstance(batch, TrainSample) else list(batch)
        if not samples:
            raise ValueError('forward_train needs at least one sample')
        cfg = self.train_cfg
        total: Dict[str, torch.Tensor] = {}
        for s in samples:
            if self.train_num_refs and (s.ref_imgs.dim() != 4 or s.ref_imgs.shape[0] < 1):
                raise ValueError(f'{self.title} training needs at least 1 reference image per sample, '
                                 f'got ref_imgs of shape {tuple(s.ref_imgs.shape)}')
            for k, v in self.losses(s, cfg).items():
                total[k] = total[k] + v if k in total else v
        return {k: v / len(samples) for k, v in total.items()}

    def rpn_and_sample(self, x: torch.Tensor, sample: TrainSample, cfg: DetectorTrainConfig, gen):
        """RPN losses on the key frame's features ``x`` (1, 512, h, w) and its sampled RoIs
        (n, 5) with their R-CNN targets (mmdet ``TwoStageDetector.forward_train`` up to the RoI head)."""
        losses, proposals = rpn_forward_train(self.detector, x, sample.img_shape, sample.gt_bboxes, cfg, gen)
        res = sample_rois(proposals, sample.gt_bboxes, sample.gt_labels, cfg, gen)
        return losses, rois_from_proposals([res.bboxes]), rcnn_targets(res, self.num_classes)

    def single_frame_losses(self, sample: TrainSample, cfg: DetectorTrainConfig,
                            x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """RPN + R-CNN losses of the plain Faster R-CNN head on final features ``x`` (1, 512, h, w)."""
        losses, rois, targets = self.rpn_and_sample(x, sample, cfg, sample.generator())
        head = self.detector.roi_head
        cls_score, bbox_pred = head.bbox_head(head.roi_align(x, rois))
        losses.update(rcnn_loss(cls_score, bbox_pred, targets))
        return losses
