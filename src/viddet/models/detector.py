"""Faster R-CNN R-50/101/X-101 DC5 as configured in MMTracking's VID configs.

Modules and state-dict names follow mmdet so that MMTracking checkpoints load unchanged:
``backbone`` (:mod:`viddet.models.backbones`), ``neck.convs.0.conv`` (ChannelMapper 2048->512,
3x3 + bias + ReLU), ``rpn_head.{rpn_conv,rpn_cls,rpn_reg}``, ``roi_head.bbox_head.{shared_fcs,
fc_cls,fc_reg}`` (+ ``aggregator`` for SELSA). REFERENCE.md §1.2–§1.7.

A frame's path: ``extract_feat`` (backbone + neck, (N,512,H/16,W/16)) -> ``rpn_head.proposals``
(300 boxes per image) -> ``roi_head.extract_rois`` (RoIAlign 7x7) -> ``roi_head.bbox_head``
(31 class logits, 120 class-specific deltas) -> ``roi_head.postprocess`` (decode, rescale to
original pixels, class-wise NMS 0.5, top 100).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from viddet.models import fused
from viddet.models.backbones import build_backbone
from viddet.models.boxes import base_anchors, batched_nms, decode_boxes, grid_anchors
from viddet.structures import Detections, ImageMeta

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


class ConvModule(nn.Module):
    """Conv2d (+ optional ReLU) stored as ``<name>.conv`` like mmcv's ConvModule."""

    def __init__(self, cin: int, cout: int, k: int, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=True)
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        return F.relu(x, inplace=True) if self.relu else x


class ChannelMapper(nn.Module):
    """mmdet ``ChannelMapper(in_channels=[C], out_channels=512, kernel_size=3)``: conv3x3 + bias + ReLU.

    Input (N, C, h, w) -> output (N, 512, h, w). Key ``convs.0.conv.{weight,bias}``.
    """

    def __init__(self, in_channels: int = 2048, out_channels: int = 512):
        super().__init__()
        self.convs = nn.ModuleList([ConvModule(in_channels, out_channels, 3)])

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
            keep = batched_nms(boxes, scores.float(), torch.zeros_like(scores, dtype=torch.int64), cfg.nms_iou)
            keep = keep[:cfg.max_per_img]
            out.append(torch.cat([boxes[keep], scores[keep, None].float()], dim=1))
        return out


class BBoxHead(nn.Module):
    """mmdet ``Shared2FCBBoxHead`` (+ MMTracking ``SelsaBBoxHead`` when ``aggregate=True``).

    Args:
        num_shared_fcs: 2 (Faster R-CNN, SELSA) or 3 (SELSA + Temporal RoI Align).
        num_classes: 30; the classifier has num_classes + 1 outputs with background LAST.
        aggregate: insert a SelsaAggregator after each shared fc, before its ReLU
            (x = fc(x); x = x + aggregator(x, fc(ref)); relu) — REFERENCE.md §5.2.

    Input RoI features (n, 512, 7, 7) -> (cls_score (n, 31), bbox_pred (n, 120)).
    """

    def __init__(self, in_channels: int = 512, roi_size: int = 7, fc_channels: int = 1024,
                 num_classes: int = 30, num_shared_fcs: int = 2, aggregate: bool = False,
                 num_attention_blocks: int = 16):
        super().__init__()
        self.num_classes = num_classes
        dims = [in_channels * roi_size * roi_size] + [fc_channels] * num_shared_fcs
        self.shared_fcs = nn.ModuleList([nn.Linear(dims[i], dims[i + 1]) for i in range(num_shared_fcs)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        if aggregate:
            from viddet.models.aggregators import SelsaAggregator
            self.aggregator = nn.ModuleList([SelsaAggregator(fc_channels, num_attention_blocks)
                                             for _ in range(num_shared_fcs)])
        else:
            self.aggregator = None

    def forward(self, x: torch.Tensor, ref_x: Optional[torch.Tensor] = None):
        """Plain path (``ref_x`` None) or SELSA path with reference RoI features (m, 512, 7, 7)."""
        x = x.flatten(1)
        if self.aggregator is None:
            for fc in self.shared_fcs:
                x = fused.linear(fc, x, 'relu')
            return fused.linear(self.fc_cls, x), fused.linear(self.fc_reg, x)
        ref_x = ref_x.flatten(1)
        for fc, agg in zip(self.shared_fcs, self.aggregator):
            x = fc(x)
            ref_x = fc(ref_x)
            x = x + agg(x, ref_x)
            x, ref_x = F.relu(x), F.relu(ref_x)
        return self.fc_cls(x), self.fc_reg(x)

    def ref_projections(self, ref_x: torch.Tensor, return_first_fc: bool = False):
        """SELSA: the per-layer reference projections (``SelsaRefProjections``) of reference RoI
        features (m, 512, 7, 7).

        They depend only on the reference frame, so a video engine computes them once per
        reference frame and concatenates them for every key frame (:meth:`forward_cached`).

        With ``return_first_fc`` also returns the first shared fc's output (m, 1024) (before ReLU):
        when the key frame's RoI features are these same features (SELSA, whose current frame is
        also a reference), :meth:`forward_cached` reuses it instead of recomputing that fc, the
        largest layer of the head (25088 x 1024).
        """
        kv = []
        ref_x = ref_x.flatten(1)
        first = None
        for fc, agg in zip(self.shared_fcs, self.aggregator):
            ref_x = fused.linear(fc, ref_x)
            first = ref_x if first is None else first
            kv.append(agg.project_refs(ref_x))
            ref_x = F.relu(ref_x)
        return (kv, first) if return_first_fc else kv

    def forward_cached(self, x: torch.Tensor, ref_kv: Sequence, first_fc: Optional[torch.Tensor] = None):
        """SELSA path from precomputed reference projections (one ``SelsaRefProjections`` per
        shared fc, e.g. the concatenation of every reference frame's :meth:`ref_projections`).

        ``first_fc``: optional precomputed ``shared_fcs[0](x.flatten(1))`` (see
        :meth:`ref_projections`); the result is the same."""
        x = x.flatten(1)
        for i, (fc, agg, refs) in enumerate(zip(self.shared_fcs, self.aggregator, ref_kv)):
            x = first_fc if i == 0 and first_fc is not None else fused.linear(fc, x)
            x = F.relu(x + agg.forward_projected(x, refs))
        return fused.linear(self.fc_cls, x), fused.linear(self.fc_reg, x)


class RoIHead(nn.Module):
    """RoI feature extraction (RoIAlign 7x7, sampling 2, aligned) + :class:`BBoxHead` + post-processing.

    ``bbox_roi_extractor`` is None for plain RoIAlign (parameter-free) or a TemporalRoIAlign module.
    """

    def __init__(self, bbox_head: BBoxHead, bbox_roi_extractor: Optional[nn.Module] = None,
                 roi_size: int = 7, stride: int = 16, sampling_ratio: int = 2):
        super().__init__()
        self.bbox_head = bbox_head
        self.bbox_roi_extractor = bbox_roi_extractor
        self.roi_size, self.stride, self.sampling_ratio = roi_size, stride, sampling_ratio

    def roi_align(self, feats: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Plain RoIAlign (mmcv defaults: aligned=True, avg): (N,C,h,w), rois (n,5) -> (n,C,7,7)."""
        return roi_align(feats.float(), rois.float(), self.roi_size, 1.0 / self.stride, self.sampling_ratio, True)

    def extract_rois(self, feats: torch.Tensor, rois: torch.Tensor,
                     ref_feats: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RoI features of the key frame; Temporal RoI Align also looks into ``ref_feats``."""
        if self.bbox_roi_extractor is not None and ref_feats is not None:
            return self.bbox_roi_extractor(feats, rois, ref_feats)
        return self.roi_align(feats, rois)

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
        keep = batched_nms(boxes, scores, labels, cfg.nms_iou)[:cfg.max_per_img]
        return Detections(boxes[keep], scores[keep], labels[keep])


def rois_from_proposals(proposals: Sequence[torch.Tensor]) -> torch.Tensor:
    """mmdet ``bbox2roi``: list of (k_i, >=4) boxes -> (sum k_i, 5) rows (batch_idx, x1, y1, x2, y2)."""
    rows = [torch.cat([p.new_full((p.shape[0], 1), i), p[:, :4]], dim=1) for i, p in enumerate(proposals)]
    return torch.cat(rows, 0)


class FasterRCNN(nn.Module):
    """The single-frame detector that every VID method builds on (MMTracking's ``detector``).

    Args:
        backbone: ``r50``, ``r101``, ``x101`` (DC5) or ``mobilenetv2`` (lite, stride 16).
        num_classes: 30 for ImageNet VID.
        num_shared_fcs, aggregate: see :class:`BBoxHead` (SELSA: aggregate=True; TRoI: 3 fcs).
        temporal_roi_align: use Temporal RoI Align as the key-frame RoI extractor.
    """

    def __init__(self, backbone: str = 'r50', num_classes: int = 30, num_shared_fcs: int = 2,
                 aggregate: bool = False, temporal_roi_align: bool = False):
        super().__init__()
        self.backbone = build_backbone(backbone)
        self.neck = ChannelMapper(self.backbone.out_channels, 512)
        self.rpn_head = RPNHead(512)
        extractor = None
        if temporal_roi_align:
            from viddet.models.aggregators import TemporalRoIAlign
            extractor = TemporalRoIAlign()
        self.roi_head = RoIHead(BBoxHead(num_classes=num_classes, num_shared_fcs=num_shared_fcs,
                                         aggregate=aggregate), extractor)
        self.rpn_test_cfg = RPNConfig()
        self.rcnn_test_cfg = RCNNConfig()

    @property
    def num_classes(self) -> int:
        return self.roi_head.bbox_head.num_classes

    def extract_feat(self, imgs: torch.Tensor) -> torch.Tensor:
        """Backbone + neck: (N, 3, Hp, Wp) normalised images -> (N, 512, Hp/16, Wp/16) (post-ReLU).

        The convolutions run in channels-last memory format (the output is channels-last too):
        oneDNN's CPU convolutions are ~30% faster on NHWC than on NCHW, with the same values up
        to float summation order (benchmarks/RESULTS.md).
        """
        return self.neck(self.backbone(imgs.contiguous(memory_format=torch.channels_last)))

    @torch.no_grad()
    def detect(self, feats: torch.Tensor, meta: ImageMeta) -> Detections:
        """Single-frame test path on one frame's neck features (1, 512, h, w)."""
        proposals = self.rpn_head.proposals(feats, [meta.img_shape], self.rpn_test_cfg)
        rois = rois_from_proposals(proposals)
        cls_score, bbox_pred = self.roi_head.bbox_head(self.roi_head.roi_align(feats, rois))
        return self.roi_head.postprocess(rois, cls_score, bbox_pred, meta, self.rcnn_test_cfg)
