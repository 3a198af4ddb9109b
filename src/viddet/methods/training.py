"""What every method's ``forward_train`` shares: the training sample type, the R-CNN loss on
sampled RoIs and the per-batch averaging.

MMTracking trains every VID method with exactly one key image per GPU (``samples_per_gpu=1``;
its ``forward_train`` asserts it) and lets distributed data parallel average the gradients. viddet
keeps that unit: :meth:`forward_train` computes each sample's losses on its own (mmdet's
``avg_factor`` normalisation per image) and returns their mean, so a batch of B samples, k
accumulated batches, or W processes give the same gradient as W*k*B GPUs with one image each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch

from viddet.models.detector import rois_from_proposals
from viddet.models.losses import (DetectorTrainConfig, default_train_config, rcnn_loss, rcnn_targets,
                                  rpn_forward_train, sample_rois, sum_losses)
from viddet.structures import ImageMeta


@dataclass
class TrainSample:
    """One training example: a key frame with its ground truth and its reference frames.

    Attributes:
        img: (3, Hp, Wp) normalised, padded key image (``viddet.data.transforms`` convention).
        ref_imgs: (R, 3, Hp, Wp) reference images, resized/flipped/padded like the key
            (R = 0 for single-frame training; DFF 1, FGFA/SELSA 2; DET images: copies of the key).
        metas: R + 1 :class:`ImageMeta`, key first.
        gt_bboxes: (g, 4) float32 key-frame boxes (x1, y1, x2, y2) in resized-image pixels.
        gt_labels: (g,) int64 0-based class labels.
        is_video_data: False for still images (ImageNet DET): DFF then ignores the warp.
        seed: seeds this sample's RoI/anchor sampling generator (None: torch's global RNG).
    """
    img: torch.Tensor
    ref_imgs: torch.Tensor
    metas: List[ImageMeta]
    gt_bboxes: torch.Tensor
    gt_labels: torch.Tensor
    is_video_data: bool = True
    seed: Optional[int] = None

    def to(self, device) -> 'TrainSample':
        """Moves the tensors to ``device``."""
        return TrainSample(self.img.to(device), self.ref_imgs.to(device), self.metas,
                           self.gt_bboxes.to(device), self.gt_labels.to(device), self.is_video_data, self.seed)

    @property
    def img_shape(self):
        return tuple(self.metas[0].img_shape)

    def ref_img_shapes(self) -> list:
        """(h, w) of each reference image (the key's when ``metas`` holds only the key's meta)."""
        shapes = [tuple(m.img_shape) for m in self.metas[1:]]
        return shapes if len(shapes) == self.ref_imgs.shape[0] else [self.img_shape] * self.ref_imgs.shape[0]

    def generator(self) -> Optional[torch.Generator]:
        """A CPU generator seeded with :attr:`seed` (None when no seed)."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(int(self.seed))


class TrainMixin:
    """``forward_train`` for the method classes (which define ``_losses_one(sample, cfg)``)."""

    def default_train_cfg(self) -> DetectorTrainConfig:
        """MMTracking's ``train_cfg`` for this method (DFF: 1000 proposals, 512 RoIs)."""
        return default_train_config(self.method)

    @property
    def train_cfg(self) -> DetectorTrainConfig:
        cfg = self.__dict__.get('_train_cfg')
        return cfg if cfg is not None else self.default_train_cfg()

    @train_cfg.setter
    def train_cfg(self, cfg: DetectorTrainConfig):
        self.__dict__['_train_cfg'] = cfg

    def forward_train(self, batch: Union[TrainSample, Sequence[TrainSample]]) -> Dict[str, torch.Tensor]:
        """Training losses of a batch, the mean over its samples of each sample's mmdet losses.

        Args:
            batch: one :class:`TrainSample` or a list of them (each on the model's device).

        Returns:
            {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'acc'}: scalar tensors;
            the total loss is :func:`viddet.models.losses.sum_losses` of it ('acc' excluded).

        Raises:
            ValueError: empty batch or a sample without the reference frames the method needs.
        """
        samples = [batch] if isinstance(batch, TrainSample) else list(batch)
        if not samples:
            raise ValueError('forward_train needs at least one sample')
        cfg = self.train_cfg
        total: Dict[str, torch.Tensor] = {}
        for s in samples:
            for k, v in self._losses_one(s, cfg).items():
                total[k] = total[k] + v if k in total else v
        return {k: v / len(samples) for k, v in total.items()}

    # -------------------------------------------------------------- shared pieces
    def _rpn_and_sample(self, x: torch.Tensor, sample: TrainSample, cfg: DetectorTrainConfig, gen):
        """RPN losses on ``x`` + the key frame's sampled RoIs (n, 5) and their targets."""
        det = self.detector
        losses, proposals = rpn_forward_train(det, x, sample.img_shape, sample.gt_bboxes, cfg, gen)
        res = sample_rois(proposals, sample.gt_bboxes, sample.gt_labels, cfg, gen)
        rois = rois_from_proposals([res.bboxes])
        return losses, rois, rcnn_targets(res, det.num_classes)

    @staticmethod
    def _check_refs(sample: TrainSample, method: str, minimum: int = 1):
        if sample.ref_imgs.dim() != 4 or sample.ref_imgs.shape[0] < minimum:
            raise ValueError(f'{method} training needs at least {minimum} reference image(s) per sample, '
                             f'got ref_imgs of shape {tuple(sample.ref_imgs.shape)}')


def single_frame_losses(model, sample: TrainSample, cfg: DetectorTrainConfig, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """RPN + R-CNN losses of a plain Faster R-CNN head on final features ``x`` (1, 512, h, w)."""
    gen = sample.generator()
    losses, rois, targets = model._rpn_and_sample(x, sample, cfg, gen)
    head = model.detector.roi_head
    cls_score, bbox_pred = head.bbox_head(head.roi_align(x, rois))
    losses.update(rcnn_loss(cls_score, bbox_pred, targets))
    return losses


__all__ = ['TrainSample', 'TrainMixin', 'single_frame_losses', 'sum_losses']
