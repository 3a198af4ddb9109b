"""Faster R-CNN DC5 as configured in MMTracking's VID configs, assembled from its parts.

:class:`FasterRCNN` holds four injected modules, like torchvision's ``GeneralizedRCNN`` and mmdet's
``TwoStageDetector``: ``backbone`` (:mod:`viddet.models.backbones`), ``neck`` (:class:`ChannelMapper`,
2048 -> 512, 3x3 + bias + ReLU), ``rpn_head`` (:class:`RPNHead`) and ``roi_head`` (:class:`RoIHead`
= an RoI extractor + a box head). The VID methods swap parts, not flags: SELSA gives it a
``SelsaBBoxHead``, Temporal RoI Align a ``TemporalRoIAlign`` extractor
(:mod:`viddet.models.aggregators`). Module names follow mmdet, so MMTracking checkpoints load
unchanged (``detector.neck.convs.0.conv.weight``, ``detector.rpn_head.rpn_cls.weight``,
``detector.roi_head.bbox_head.shared_fcs.0.weight``, ...). Sources: MMTracking 0.14
``configs/_base_/models/faster_rcnn_r50_dc5.py`` and the mmdet 2.x classes it names
(``ChannelMapper``, ``RPNHead``, ``StandardRoIHead``, ``SingleRoIExtractor``, ``Shared2FCBBoxHead``).

A frame's path: :meth:`FasterRCNN.extract_feat` (backbone + neck, (N, 512, H/16, W/16)) ->
:meth:`FasterRCNN.proposals` (300 boxes) -> ``roi_head.roi_align`` (RoIAlign 7x7) ->
``roi_head.bbox_head`` (31 class logits, 120 class-specific deltas) -> ``roi_head.postprocess``
(decode, rescale to original pixels, class-wise NMS 0.5, top 100); :meth:`FasterRCNN.detect` runs
it all on final features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from viddet.models.backbones import build_backbone
from viddet.models.boxes import base_anchors, batched_nms, decode_boxes, grid_anchors
from viddet.models.layers import ConvAct
from viddet.structures import Detections, ImageMeta
from viddet.timing import NO_TIMER, StageTimer

RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.2, 0.2, 0.2, 0.2)


@dataclass
class RPNConfig:
    """Proposal settings (mmdet ``rpn``/``rpn_proposal`` cfg). Test: 6000 -> NMS 0.7 -> 300."""
    nms_pre: int = 6000
    max_per_img: int = 300
    nms_iou: float = 0.7
    min_bbox_size: float = 0.0


@dataclass
class RCNNConfig:
    """R-CNN test settings (mmdet ``test_cfg.rcnn``): score > 1e-4, class-wise NMS 0.5, top 100."""
    score_thr: float = 1e-4
    nms_iou: float = 0.5
    max_per_img: int = 100


class ChannelMapper(nn.Module):
    """mmdet ``ChannelMapper(in_channels=[C], out_channels=512, kernel_size=3)``: conv3x3 + bias + ReLU.

    Input (N, C, h, w) -> output (N, 512, h, w). Key ``convs.0.conv.{weight,bias}``.
    """

    def __init__(self, in_channels: int = 2048, out_channels: int = 512):
        super().__init__()
        self.convs = nn.ModuleList([ConvAct(in_channels, out_channels, 3, padding=1, act='relu')])

    def forward(self, x):
        return self.convs[0](x)


class RPNHead(nn.Module):
    """mmdet ``RPNHead``: 3x3 conv + ReLU, 1x1 objectness (12 sigmoid logits), 1x1 deltas (48).

    Anchors: stride 16, scales (4, 8, 16, 32), ratios (0.5, 1, 2), centred on k*16 (no offset).
    """

    def __init__(self, channels: int = 512, stride: int = 16, scales=(4, 8, 16, 32), ratios=(0.5, 1.0, 2.0)):
        super().__init__()
        self.stride = stride
        self.num_anchors = len(scales) * len(ratios)
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, self.num_anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, self.num_anchors * 4, 1)
        self.register_buffer('base_anchors', base_anchors(stride, scales, ratios), persistent=False)
        self._anchor_cache: Dict[Tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor):
        """(N, 512, h, w) -> (objectness logits (N, A, h, w), deltas (N, 4A, h, w))."""
        x = F.relu(self.rpn_conv(x), inplace=True)
        return self.rpn_cls(x), self.rpn_reg(x)

    def anchors(self, feat_size: Tuple[int, int], device) -> torch.Tensor:
        """(h*w*A, 4) anchors of a feature map, cached per size and device."""
        key = (tuple(feat_size), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = grid_anchors(self.base_anchors, feat_size, self.stride, device)
        return self._anchor_cache[key]

    def nms(self, boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
            max_keep: int) -> torch.Tensor:
        """The first ``max_keep`` boxes that NMS keeps (mmdet ``RPNHead._bbox_post_process``:
        ``batched_nms`` then ``dets[:max_per_img]``); :func:`viddet.models.boxes.batched_nms` args.
        ``speedups.convert`` swaps in an NMS that stops at the ``max_keep``-th kept box (same result).

        Returns:
            (k,) int64 indices into ``boxes``, k <= max_keep, best first.
        """
        return batched_nms(boxes, scores, idxs, iou_threshold)[:max_keep]

    @torch.no_grad()
    def proposals(self, x: torch.Tensor, img_shapes: Sequence[Tuple[int, int]],
                  cfg: RPNConfig = RPNConfig()) -> List[torch.Tensor]:
        """Proposals per image (mmdet-2.x ``RPNHead._get_bboxes_single``).

        Top ``nms_pre`` anchors by sigmoid score -> decode (clipped to the unpadded image) ->
        drop boxes with w or h <= min_bbox_size -> NMS -> first ``max_per_img``.

        Args:
            x: (N, 512, h, w) neck features.
            img_shapes: N (height, width) unpadded resized image sizes, pixels.

        Returns:
            N tensors (k_i, 5): (x1, y1, x2, y2, score) in resized-image pixels, score-sorted.
        """
        cls, reg = self.forward(x)
        return self.proposals_from_outputs(cls, reg, img_shapes, cfg)

    def proposals_from_outputs(self, cls: torch.Tensor, reg: torch.Tensor,
                               img_shapes: Sequence[Tuple[int, int]], cfg: RPNConfig) -> List[torch.Tensor]:
        """Same as :meth:`proposals` from precomputed head outputs (used in training)."""
        n, a, h, w = cls.shape
        anchors = self.anchors((h, w), cls.device)
        scores_all = cls.detach().permute(0, 2, 3, 1).reshape(n, -1).sigmoid()
        deltas_all = reg.detach().permute(0, 2, 3, 1).reshape(n, -1, 4)
        out = []
        for i in range(n):
            scores, deltas, anc = scores_all[i], deltas_all[i], anchors
            if 0 < cfg.nms_pre < scores.shape[0]:
                scores, order = scores.sort(descending=True)
                scores, order = scores[:cfg.nms_pre], order[:cfg.nms_pre]
                deltas, anc = deltas[order], anc[order]
            boxes = decode_boxes(anc, deltas.float(), RPN_STDS, img_shapes[i])
            if cfg.min_bbox_size >= 0:
                wh = boxes[:, 2:] - boxes[:, :2]
                valid = (wh[:, 0] > cfg.min_bbox_size) & (wh[:, 1] > cfg.min_bbox_size)
                if not bool(valid.all()):
                    boxes, scores = boxes[valid], scores[valid]
            keep = self.nms(boxes, scores.float(), torch.zeros_like(scores, dtype=torch.int64), cfg.nms_iou,
                            cfg.max_per_img)
            out.append(torch.cat([boxes[keep], scores[keep, None].float()], dim=1))
        return out


class BBoxHead(nn.Module):
    """mmdet ``Shared2FCBBoxHead``: flatten -> ``num_shared_fcs`` x (fc + ReLU) -> ``fc_cls`` and
    ``fc_reg`` (class-specific, ``reg_class_agnostic=False``).

    Args:
        num_classes: 30; the classifier has num_classes + 1 outputs with background LAST.
        num_shared_fcs: 2 (Faster R-CNN, SELSA) or 3 (SELSA + Temporal RoI Align).

    Input RoI features (n, 512, 7, 7) -> (cls_score (n, C + 1), bbox_pred (n, 4C)).
    """

    def __init__(self, in_channels: int = 512, roi_size: int = 7, fc_channels: int = 1024,
                 num_classes: int = 30, num_shared_fcs: int = 2):
        super().__init__()
        self.num_classes = num_classes
        dims = [in_channels * roi_size * roi_size] + [fc_channels] * num_shared_fcs
        self.shared_fcs = nn.ModuleList([nn.Linear(dims[i], dims[i + 1]) for i in range(num_shared_fcs)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)

    def forward(self, x: torch.Tensor):
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class SingleRoIExtractor(nn.Module):
    """mmdet ``SingleRoIExtractor`` with one feature level: mmcv ``RoIAlign(output_size=7,
    sampling_ratio=2, aligned=True)``, average pooling, spatial scale 1/16 (parameter-free).

    ``forward(feats (B, C, H, W), rois (n, 5) [batch_index, x1, y1, x2, y2] in input pixels)``
    -> (n, C, 7, 7).
    """

    def __init__(self, output_size: int = 7, spatial_scale: float = 1.0 / 16, sampling_ratio: int = 2):
        super().__init__()
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio

    def roi_align(self, feats: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Plain RoIAlign of ``rois`` on ``feats`` (float32)."""
        return roi_align(feats.float(), rois.float(), self.output_size, self.spatial_scale,
                         self.sampling_ratio, True)

    def forward(self, feats: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return self.roi_align(feats, rois)


class RoIHead(nn.Module):
    """mmdet ``StandardRoIHead`` at test time: an RoI extractor + a box head + post-processing.

    Args:
        bbox_head: :class:`BBoxHead` or a subclass (SELSA's).
        bbox_roi_extractor: :class:`SingleRoIExtractor` (default) or a subclass (Temporal RoI
            Align); its parameters, if any, are stored under ``roi_head.bbox_roi_extractor.``.
    """

    def __init__(self, bbox_head: BBoxHead, bbox_roi_extractor: Optional[SingleRoIExtractor] = None):
        super().__init__()
        self.bbox_head = bbox_head
        self.bbox_roi_extractor = bbox_roi_extractor if bbox_roi_extractor is not None else SingleRoIExtractor()

    def roi_align(self, feats: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Plain RoIAlign (n, C, 7, 7) of ``rois`` (n, 5) on ``feats`` (N, C, h, w), whatever the extractor."""
        return self.bbox_roi_extractor.roi_align(feats, rois)

    def nms(self, boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
            max_keep: int) -> torch.Tensor:
        """The first ``max_keep`` (box, class) pairs that class-wise NMS keeps (mmdet
        ``multiclass_nms``: ``batched_nms`` then ``[:max_num]``); ``idxs`` are the class labels.
        ``speedups.convert`` swaps in an NMS that stops at the ``max_keep``-th kept box (same result).

        Returns:
            (k,) int64 indices into ``boxes``, k <= max_keep, best first.
        """
        return batched_nms(boxes, scores, idxs, iou_threshold)[:max_keep]

    @torch.no_grad()
    def postprocess(self, rois: torch.Tensor, cls_score: torch.Tensor, bbox_pred: torch.Tensor,
                    meta: ImageMeta, cfg: RCNNConfig = RCNNConfig()) -> Detections:
        """mmdet-2.x ``BBoxHead.get_bboxes`` + ``multiclass_nms`` with ``rescale=True``.

        softmax over 31 columns -> class-specific decode clipped to ``meta.img_shape`` -> boxes
        divided by ``meta.scale_factor`` (original pixels, no clipping) -> drop background ->
        keep score > score_thr -> class-wise NMS -> top ``max_per_img`` by score.

        Args:
            rois: (n, 5) (batch_idx, x1, y1, x2, y2) in resized-image pixels.
            cls_score: (n, C+1) logits; bbox_pred: (n, 4C) deltas.
        """
        num_classes = cls_score.shape[1] - 1
        scores = F.softmax(cls_score.float(), dim=-1)
        boxes = decode_boxes(rois[:, 1:].float(), bbox_pred.float(), RCNN_STDS, meta.img_shape)
        scale = torch.as_tensor(meta.scale_factor, dtype=boxes.dtype, device=boxes.device)
        boxes = (boxes.view(boxes.shape[0], -1, 4) / scale).reshape(-1, 4)
        scores = scores[:, :-1].reshape(-1)
        labels = torch.arange(num_classes, device=scores.device).repeat(cls_score.shape[0])
        valid = (scores > cfg.score_thr).nonzero().view(-1)
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        if boxes.numel() == 0:
            return Detections.empty(boxes.device)
        keep = self.nms(boxes, scores, labels, cfg.nms_iou, cfg.max_per_img)
        return Detections(boxes[keep], scores[keep], labels[keep])


def rois_from_proposals(proposals: Sequence[torch.Tensor]) -> torch.Tensor:
    """mmdet ``bbox2roi``: list of (k_i, >=4) boxes -> (sum k_i, 5) rows (batch_idx, x1, y1, x2, y2)."""
    rows = [torch.cat([p.new_full((p.shape[0], 1), i), p[:, :4]], dim=1) for i, p in enumerate(proposals)]
    return torch.cat(rows, 0)


class FasterRCNN(nn.Module):
    """The single-frame detector that every VID method has (MMTracking's ``detector``).

    Args:
        backbone: (N, 3, H, W) -> (N, C_b, H/16, W/16), e.g. :class:`viddet.models.backbones.ResNetDC5`.
        neck: (N, C_b, h, w) -> (N, 512, h, w), :class:`ChannelMapper`.
        rpn_head: :class:`RPNHead`.
        roi_head: :class:`RoIHead`.
        rpn_test_cfg, rcnn_test_cfg: test-time proposal and detection settings (mmdet ``test_cfg``).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, rpn_head: RPNHead, roi_head: RoIHead,
                 rpn_test_cfg: Optional[RPNConfig] = None, rcnn_test_cfg: Optional[RCNNConfig] = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_head = roi_head
        self.rpn_test_cfg = rpn_test_cfg or RPNConfig()
        self.rcnn_test_cfg = rcnn_test_cfg or RCNNConfig()

    @property
    def num_classes(self) -> int:
        return self.roi_head.bbox_head.num_classes

    def extract_feat(self, imgs: torch.Tensor) -> torch.Tensor:
        """Backbone + neck: (N, 3, Hp, Wp) normalised images -> (N, 512, Hp/16, Wp/16) (post-ReLU)."""
        return self.neck(self.backbone(imgs))

    @torch.no_grad()
    def proposals(self, feats: torch.Tensor, meta: ImageMeta) -> torch.Tensor:
        """Test-time RPN proposals of one frame as RoIs: (k, 5) [0, x1, y1, x2, y2], k <= 300,
        resized-image pixels, best first."""
        return rois_from_proposals(self.rpn_head.proposals(feats, [meta.img_shape], self.rpn_test_cfg))

    @torch.no_grad()
    def detect(self, feats: torch.Tensor, meta: ImageMeta, timer: StageTimer = NO_TIMER) -> Detections:
        """The single-frame test path on one frame's final features (1, 512, h, w): proposals ->
        RoIAlign -> box head -> post-processing (mmdet ``TwoStageDetector.simple_test``). Every
        method ends with it once its features are aggregated or warped."""
        with timer('rpn'):
            rois = self.proposals(feats, meta)
        with timer('roi_head'):
            cls_score, bbox_pred = self.roi_head.bbox_head(self.roi_head.roi_align(feats, rois))
        with timer('nms'):
            return self.roi_head.postprocess(rois, cls_score, bbox_pred, meta, self.rcnn_test_cfg)


def build_faster_rcnn(backbone: str = 'r50', bbox_head: Optional[BBoxHead] = None,
                      bbox_roi_extractor: Optional[SingleRoIExtractor] = None, num_classes: int = 30) -> FasterRCNN:
    """The DC5 Faster R-CNN of MMTracking's VID configs with the given box head and RoI extractor.

    Args:
        backbone: a name of :data:`viddet.models.backbones.BACKBONES` (``r50``, ``r101``, ``x101``,
            ``mobilenetv2``).
        bbox_head: default ``BBoxHead(num_classes=num_classes)`` (Shared2FC).
        bbox_roi_extractor: default :class:`SingleRoIExtractor`.

    Raises:
        VidDetError: unknown backbone name.
    """
    body = build_backbone(backbone)
    head = bbox_head if bbox_head is not None else BBoxHead(num_classes=num_classes)
    return FasterRCNN(body, ChannelMapper(body.out_channels, 512), RPNHead(512), RoIHead(head, bbox_roi_extractor))
