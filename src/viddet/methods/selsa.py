"""SELSA, Sequence Level Semantics Aggregation (Wu et al., ICCV 2019, §3); MMTracking
``mmtrack/models/vid/selsa.py`` with ``SelsaRoIHead`` / ``SelsaBBoxHead`` and its test protocol
``test_with_adaptive_stride``. SELSA + Temporal RoI Align (:mod:`viddet.methods.troi`) builds on it.

Offline (MMTracking's test protocol): 14 reference frames spread evenly over the whole video,
``round(i * (L - 1) / 13)`` for i = 0..13, chosen once per video, plus the current frame. Each
reference frame contributes its 300 test-RPN proposals; the key frame's proposals attend to all of
them (multi-head attention after each shared fc, before its ReLU).

MMTracking re-runs the RPN and RoI head on all 14 references for every frame. viddet computes
each reference frame's proposals, RoI features and attention projections once and caches them; the
math is unchanged (the reference path does not depend on the key frame). The current frame's
reference proposals are its own key proposals, so they are computed once too.

Online (causal): up to 14 past frames kept at a doubling stride (0, s, 2s, ... over the frames seen
so far) plus the current frame; each enters the reference set when it is the current frame, so
no frame is ever processed twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from viddet.errors import VidDetError
from viddet.methods.base import MethodSettings, at_least
from viddet.methods.faster_rcnn import FasterRCNNMethod
from viddet.models.aggregators import SelsaBBoxHead, SelsaRefProjections
from viddet.models.detector import build_faster_rcnn, rois_from_proposals
from viddet.models.losses import rcnn_loss
from viddet.structures import Detections, TrainSample


@dataclass
class _Reference:
    """Cached reference frame: neck features (kept for Temporal RoI Align or uncached mode) and
    the per-fc attention projections of its 300 proposals."""
    feats: Optional[torch.Tensor]
    meta: object
    projections: Optional[List[SelsaRefProjections]]


def adaptive_stride_refs(length: int, num_refs: int = 14) -> List[int]:
    """MMTracking ``test_with_adaptive_stride`` reference frames of a video of ``length`` frames.

    Returns ``[round(i * (length - 1) / (num_refs - 1)) for i in range(num_refs)]`` (Python
    rounding; duplicates kept, e.g. 14 zeros for a 1-frame video).
    """
    if length < 1:
        raise ValueError(f'video length must be >= 1, got {length}')
    stride = float(length - 1) / (num_refs - 1)
    return [round(i * stride) for i in range(num_refs)]


@dataclass
class SELSASettings(MethodSettings):
    """SELSA's (and TRoI's) inference settings (MMTracking's test-time reference sampler)."""
    num_refs: int = field(default=14, metadata={
        'help': 'SELSA/TRoI: reference frames (offline spread over the video, online the last ones)'})
    ref_cache: bool = field(default=True, metadata={
        'help': 'SELSA/TRoI: each reference frame computed once per video (false: every frame, as MMTracking)'})

    def __post_init__(self):
        at_least(self, 1, 'num_refs')


class SELSA(FasterRCNNMethod):
    """Attribute ``detector`` (:class:`FasterRCNN` with a :class:`SelsaBBoxHead`).

    Args:
        num_refs: reference frames besides the current one (14).
        ref_cache: cache each reference frame's proposals and projections (default). False
            recomputes them for every frame, as MMTracking does (for benchmarking the cache).
    """

    name = 'selsa'
    title = 'SELSA'
    paper = 'Wu et al., Sequence Level Semantics Aggregation for Video Object Detection, ICCV 2019'
    default_checkpoint = 'selsa_r50'
    signature = ('detector.backbone.', 'detector.roi_head.bbox_head.aggregator.')
    train_num_refs = 2
    Settings = SELSASettings
    keeps_reference_maps = False
    """Whether the reference frames' feature maps are needed after their proposals (TRoI: yes)."""

    def __init__(self, detector, num_refs: int = 14, ref_cache: bool = True):
        super().__init__(detector)
        if num_refs < 1:
            raise ValueError(f'num_refs must be >= 1, got {num_refs}')
        self.num_refs = num_refs
        self.ref_cache = ref_cache
        self.reset()

    @classmethod
    def build(cls, backbone: str = 'r50', num_classes: int = 30, num_refs: int = 14,
              ref_cache: bool = True) -> 'SELSA':
        return cls(build_faster_rcnn(backbone, SelsaBBoxHead(num_classes, cls.num_shared_fcs)), num_refs, ref_cache)

    def key_rois(self, x: torch.Tensor, rois: torch.Tensor, roi_feats: torch.Tensor, ref_maps) -> torch.Tensor:
        """RoI features (n, 512, 7, 7) of the key frame's proposals ``rois`` (n, 5) on ``x``: SELSA
        uses their plain RoIAlign features ``roi_feats``; Temporal RoI Align aggregates them over the
        reference maps ``ref_maps`` ((T, 512, h, w) or T maps (1, 512, h, w))."""
        return roi_feats

    def reset(self):
        """Forgets the cached reference frames (proposals, RoI features, attention projections)."""
        self._refs: Dict[int, _Reference] = {}
        self._ref_ids: List[int] = []   # offline: the 14 ids (with duplicates); online: reservoir
        self._stride = 1                 # online reservoir stride, frames
        self._ref_kv = None              # (ref ids, per-layer concatenated reference projections)

    # ------------------------------------------------------------------ reference frames
    def _projections(self, feats, meta, timer) -> List[SelsaRefProjections]:
        with timer('rpn'):
            rois = self.detector.proposals(feats, meta)
        with timer('roi_head'):
            return self.detector.roi_head.bbox_head.ref_projections(self.detector.roi_head.roi_align(feats, rois))

    def _make_reference(self, feats, meta, timer, projections=None) -> _Reference:
        keep_feats = self.keeps_reference_maps or not self.ref_cache
        if self.ref_cache and projections is None:
            projections = self._projections(feats, meta, timer)
        return _Reference(feats if keep_feats else None, meta, projections if self.ref_cache else None)

    def _offline_refs(self, ctx) -> List[int]:
        if not self._ref_ids:
            if ctx.length is None:
                raise VidDetError('offline SELSA needs the video length (14 references spread over the '
                                  'whole video); this source does not tell it: use --mode online')
            self._ref_ids = adaptive_stride_refs(ctx.length, self.num_refs)
            for i in sorted(set(self._ref_ids)):
                frame = ctx.fetch(i)
                with ctx.timer('backbone'):
                    feats = self.detector.extract_feat(frame.img)
                self._refs[i] = self._make_reference(feats, frame.meta, ctx.timer)
        return self._ref_ids

    def _update_reservoir(self, index: int, ref: _Reference):
        """Online: keep frames at multiples of a stride that doubles when more than num_refs are held."""
        if index % self._stride:
            return
        self._refs[index] = ref
        self._ref_ids.append(index)
        while len(self._ref_ids) > self.num_refs:
            self._stride *= 2
            self._ref_ids = [i for i in self._ref_ids if i % self._stride == 0]
            self._refs = {i: self._refs[i] for i in self._ref_ids}

    # ------------------------------------------------------------------ per frame
    def predict(self, frame, ctx) -> Detections:
        """Detections of ``frame``: its 300 proposals' RoI features attend, after each shared fc and
        before its ReLU, to the RoIs of the reference frames and of the frame itself (offline: 14
        references spread over the whole video, chosen once; online: up to 14 earlier frames), as
        MMTracking ``SELSA.simple_test`` with ``test_with_adaptive_stride``. Each reference's backbone,
        RPN and attention projections are computed once and cached (``ref_cache``); TRoI first
        replaces the frame's RoI features by its Temporal RoI Align over the same frames."""
        ref_ids = self._offline_refs(ctx) if ctx.mode == 'offline' else list(self._ref_ids)
        det, head = self.detector, self.detector.roi_head
        with ctx.timer('backbone'):
            x = det.extract_feat(frame.img)
        with ctx.timer('rpn'):
            rois = det.proposals(x, frame.meta)
        refs = [self._refs[i] for i in ref_ids]
        with ctx.timer('roi_head'):
            cur_rois = head.roi_align(x, rois)
            cur_proj, cur_fc1 = head.bbox_head.ref_projections(cur_rois, return_first_fc=True)
        if self.ref_cache:
            # the references' projections, concatenated once per reference set (offline: per video)
            if self._ref_kv is None or self._ref_kv[0] != tuple(ref_ids):
                self._ref_kv = (tuple(ref_ids), [SelsaRefProjections.cat([r.projections[layer] for r in refs])
                                                 for layer in range(len(cur_proj))] if refs else None)
                if ctx.mode == 'offline':  # the set never changes within the video: keep one copy
                    for r in refs:
                        r.projections = None
            ref_kv = self._ref_kv[1]
        else:  # MMTracking's way: the references' RPN and RoI head again, every frame
            projections = [self._projections(r.feats, r.meta, ctx.timer) for r in refs]
            ref_kv = [SelsaRefProjections.cat([p[layer] for p in projections])
                      for layer in range(len(cur_proj))] if refs else None
        with ctx.timer('aggregation'):
            key_rois = self.key_rois(x, rois, cur_rois, [r.feats for r in refs] + [x])
            kv = [SelsaRefProjections.cat(([ref_kv[layer]] if ref_kv else []) + [cur_proj[layer]])
                  for layer in range(len(cur_proj))]
            # when the key RoI features are cur_rois (SELSA), reuse their first fc (computed above)
            first_fc = cur_fc1 if key_rois is cur_rois else None
            cls_score, bbox_pred = head.bbox_head.forward_cached(key_rois, kv, first_fc)
        with ctx.timer('nms'):
            dets = head.postprocess(rois, cls_score, bbox_pred, frame.meta, det.rcnn_test_cfg)
        if ctx.mode == 'online':
            self._update_reservoir(frame.index, self._make_reference(x, frame.meta, ctx.timer, cur_proj))
        return dets

    # ------------------------------------------------------------------ training
    def losses(self, sample: TrainSample, cfg) -> dict:
        """Training losses of one sample (MMTracking ``SELSA.forward_train`` +
        ``SelsaRoIHead.forward_train``).

        Key and references go through the backbone together. The key frame gets the training RPN
        (losses + 600 proposals -> assign/sample 256 RoIs with the GT added); every reference
        frame gets the *test* RPN (300 proposals, no gradient). The key RoIs (Temporal RoI Align:
        aggregated over the reference maps) attend to all reference RoIs in the SELSA head; the
        R-CNN losses use the key RoIs only.
        """
        det, head = self.detector, self.detector.roi_head
        gen = sample.generator()
        all_x = det.extract_feat(torch.cat([sample.img[None], sample.ref_imgs], dim=0))
        x, ref_x = all_x[:1], all_x[1:]
        losses, rois, targets = self.rpn_and_sample(x, sample, cfg, gen)
        with torch.no_grad():
            ref_props = det.rpn_head.proposals(ref_x, sample.ref_img_shapes(),
                                               det.rpn_test_cfg)
        ref_rois = rois_from_proposals(self.traced_ref_proposals(ref_props))
        bbox_feats = self.key_rois(x, rois, head.roi_align(x, rois), ref_x)
        ref_bbox_feats = head.roi_align(ref_x, ref_rois)
        cls_score, bbox_pred = head.bbox_head(bbox_feats, ref_bbox_feats)
        losses.update(rcnn_loss(cls_score, bbox_pred, targets))
        return losses
