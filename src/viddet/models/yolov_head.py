"""The video heads of YOLOV (Shi et al., "YOLOV: Making Still Image Object Detectors Great at Video
Object Detection", AAAI 2023) and YOLOV++ (Shi et al., IJCV 2025), as the official code computes them
at test time (github.com/YuHengsss/YOLOV: ``yolox/models/yolovp_msa.py`` ``YOLOXHead``,
``yolox/models/v_plus_head.py`` ``YOLOVHead``, ``yolox/models/post_trans.py`` ``Attention_msa`` /
``MSA_yolov``, ``yolox/models/post_process.py`` ``postprocess``). Written from those semantics;
attribute names are the official ones so that released checkpoints load unchanged.

One call sees a batch of frames; the candidates of all its frames attend to one another:

1. still-image YOLOX predictions per frame (:class:`viddet.models.yolox.YOLOXHead`);
2. feature selection: YOLOV top-750 anchors by objectness -> class-aware NMS 0.75 -> first 30;
   YOLOV++ every anchor with obj · cls >= 0.001 (at least ``minimal_limit``), in anchor order;
3. aggregation (:class:`MSA`): 4-head attention with cosine affinities × 25, the class branch
   weighted by the key's class score, then averaging over references whose head-mean cosine is
   above 0.75 (YOLOV++'s objectness branch: 0.99, features of ``agg_iou``);
4. refined class scores (and YOLOV++'s objectness), every (candidate, class) pair with
   score >= 0.001 and obj · score >= 0.001, class-aware NMS 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import nn

from viddet.models.yolox import YOLOXHead

CONF_THRESH = 0.001
FINAL_NMS = 0.5


@dataclass
class HeadOutput:
    """What a video head computes for a batch of B frames (boxes in input pixels).

    Attributes:
        decoded: (B, A, 5 + K) still-image predictions before selection (cx, cy, w, h, obj, K cls).
        selected: B index tensors into the A anchors: each frame's candidates, in the head's order.
        detections: B (n, 7) tensors (x1, y1, x2, y2, obj, cls, label): the video detections.
        still: B (n, 7) tensors: the still-image detections of the candidates.
    """
    decoded: torch.Tensor
    selected: List[torch.Tensor]
    detections: List[torch.Tensor]
    still: List[torch.Tensor]


def corner_rows(decoded: torch.Tensor) -> torch.Tensor:
    """(A, 5 + K) decoded predictions -> (A, 7 + K) rows x1, y1, x2, y2, obj, max cls, argmax class
    (float), K class scores (the official selection's ``detections`` layout)."""
    cx, cy, w, h = decoded[:, 0], decoded[:, 1], decoded[:, 2], decoded[:, 3]
    corners = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 1)
    conf, label = decoded[:, 5:].max(1, keepdim=True)
    return torch.cat((corners, decoded[:, 4:5], conf, label.float(), decoded[:, 5:]), 1)


def select_top_nms(rows: torch.Tensor, pre: int = 750, post: int = 30, nms_thresh: float = 0.75) -> torch.Tensor:
    """YOLOV's candidates of one frame: the ``pre`` anchors of highest objectness (``torch.topk``),
    class-aware NMS by obj · cls at ``nms_thresh``, the first ``post`` kept. Returns anchor indices."""
    order = torch.topk(rows[:, 4], k=min(pre, rows.shape[0])).indices
    top = rows[order]
    keep = torchvision.ops.batched_nms(top[:, :4], top[:, 4] * top[:, 5], top[:, 6], nms_thresh)
    return order[keep[:post]]


def select_by_score(rows: torch.Tensor, conf: float = CONF_THRESH, minimal_limit: int = 0) -> torch.Tensor:
    """YOLOV++'s candidates of one frame: every anchor with obj · cls >= ``conf``; when fewer than
    ``minimal_limit`` pass, the top-``minimal_limit`` by obj · cls are added. Anchor order."""
    score = rows[:, 4] * rows[:, 5]
    mask = score >= conf
    if minimal_limit and int(mask.sum()) < minimal_limit:
        mask[torch.topk(score, min(minimal_limit, score.numel())).indices] = True
    return torch.where(mask)[0]


def still_detections(cands: torch.Tensor, conf: float = CONF_THRESH, nms_thresh: float = FINAL_NMS) -> torch.Tensor:
    """The still-image detections of the candidates (n, 7 + K): obj · cls >= ``conf``, class-aware
    NMS; (m, 7) rows in descending score."""
    rows = cands[:, :7]
    rows = rows[rows[:, 4] * rows[:, 5] >= conf]
    keep = torchvision.ops.batched_nms(rows[:, :4], rows[:, 4] * rows[:, 5], rows[:, 6], nms_thresh)
    return rows[keep]


def refined_detections(cands: torch.Tensor, logits: torch.Tensor, obj: Optional[torch.Tensor],
                       conf: float = CONF_THRESH, nms_thresh: float = FINAL_NMS) -> torch.Tensor:
    """Video detections of one frame (official ``postprocess``).

    Args:
        cands: (n, 7 + K) candidate rows (:func:`corner_rows`).
        logits: (n, K) refined class logits.
        obj: (n,) refined objectness logits (YOLOV++) or None (YOLOV keeps the still objectness).
    Returns:
        (m, 7) rows x1, y1, x2, y2, obj, cls, label: each (candidate, class) with sigmoid(logit) >=
        ``conf`` and obj · cls >= ``conf``, class-aware NMS, descending score.
    """
    rows = cands[:, :7].clone()
    if obj is not None:
        rows[:, 4] = obj.sigmoid()
    scores = logits.sigmoid()
    cand, cls = torch.where(scores >= conf)
    out = rows[cand]
    out[:, 5] = scores[cand, cls]
    out[:, 6] = cls.to(out.dtype)
    out = out[out[:, 4] * out[:, 5] >= conf]
    keep = torchvision.ops.batched_nms(out[:, :4], out[:, 4] * out[:, 5], out[:, 6], nms_thresh)
    return out[keep]


class AffinityAttention(nn.Module):
    """Multi-head attention with cosine affinities (official ``Attention_msa``), over N candidates.

    q, k, v from bias-free linear layers (``qkv_cls`` on class features, ``qkv_reg`` on box
    features), split in ``heads``; q and k L2-normalised per head; logits ``scale · cos(q, k)``, the
    class branch multiplied by the key's class score; the two softmaxes averaged.

    Returns, for x_cls, x_reg (1, N, C) and cls_score (N,):
        (cat(attn @ v_cls, v_cls) (1, N, 2C), cat(attn @ v_reg, v_reg) (1, N, 2C),
        cls_weights (N, N), obj_weights (N, N)): the averaging weights: softmax of the head-mean
        attention, masked to references whose head-mean cosine of normalised v_cls exceeds
        ``sim_thresh`` and renormalised; obj_weights further masked by the v_reg cosine >
        ``conf_sim_thresh`` and renormalised.
    """

    def __init__(self, dim: int, heads: int = 4, scale: float = 25.0):
        super().__init__()
        self.heads = heads
        self.scale = scale
        self.qkv_cls = nn.Linear(dim, dim * 3, bias=False)
        self.qkv_reg = nn.Linear(dim, dim * 3, bias=False)

    def _split(self, layer: nn.Linear, x: torch.Tensor):
        b, n, c = x.shape
        q, k, v = layer(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True), v

    def forward(self, x_cls: torch.Tensor, x_reg: torch.Tensor, cls_score: torch.Tensor,
                sim_thresh: float = 0.75, conf_sim_thresh: float = 0.99):
        b, n, c = x_cls.shape
        q_cls, k_cls, v_cls = self._split(self.qkv_cls, x_cls)
        q_reg, k_reg, v_reg = self._split(self.qkv_reg, x_reg)
        vn_cls = v_cls / v_cls.norm(dim=-1, keepdim=True)
        vn_reg = v_reg / v_reg.norm(dim=-1, keepdim=True)
        attn_cls = (q_cls @ k_cls.transpose(-2, -1)) * self.scale * cls_score.reshape(1, 1, 1, -1)
        attn_reg = (q_reg @ k_reg.transpose(-2, -1)) * self.scale
        attn = (attn_reg.softmax(dim=-1) + attn_cls.softmax(dim=-1)) / 2
        out_cls = torch.cat([(attn @ v_cls).transpose(1, 2).reshape(b, n, c),
                             v_cls.permute(0, 2, 1, 3).reshape(b, n, c)], dim=-1)
        out_reg = torch.cat([(attn @ v_reg).transpose(1, 2).reshape(b, n, c),
                             v_reg.permute(0, 2, 1, 3).reshape(b, n, c)], dim=-1)
        cos_cls = torch.sum(vn_cls @ vn_cls.transpose(-2, -1), dim=1)[0] / self.heads
        cos_reg = torch.sum(vn_reg @ vn_reg.transpose(-2, -1), dim=1)[0] / self.heads
        weights = torch.softmax(torch.sum(attn, dim=1)[0] / self.heads, dim=-1)
        sim_mask = (cos_cls > sim_thresh).to(weights.dtype)
        weights = sim_mask * weights / torch.sum(sim_mask * weights, dim=-1, keepdim=True)
        obj_mask = (cos_reg > conf_sim_thresh).to(weights.dtype)
        obj_weights = obj_mask * weights / torch.sum(obj_mask * weights, dim=-1, keepdim=True)
        return out_cls, out_reg, weights, obj_weights


class MSA(nn.Module):
    """YOLOV's feature aggregation module (official ``MSA_yolov``): :class:`AffinityAttention`
    (``msa``), ``linear1`` (2C -> 2C), averaging over similar references, ``linear2`` on
    cat(average, own) (4C -> 4C); with ``reconf`` the same for the box branch (``linear1_obj``,
    ``linear2_obj``)."""

    def __init__(self, dim: int, heads: int = 4, reconf: bool = False):
        super().__init__()
        self.msa = AffinityAttention(dim, heads)
        self.linear1 = nn.Linear(2 * dim, 2 * dim)
        self.linear2 = nn.Linear(4 * dim, 4 * dim)
        if reconf:
            self.linear1_obj = nn.Linear(2 * dim, 2 * dim)
            self.linear2_obj = nn.Linear(4 * dim, 4 * dim)

    def forward(self, x_cls: torch.Tensor, x_reg: torch.Tensor, cls_score: torch.Tensor,
                sim_thresh: float = 0.75, want_cls: bool = True, want_obj: bool = False):
        """x_cls, x_reg (N, C), cls_score (N,) -> (class features (N, 4C) or None, box features
        (N, 4C) or None; only the branches asked for are computed)."""
        t_cls, t_reg, w_cls, w_obj = self.msa(x_cls[None], x_reg[None], cls_score, sim_thresh)
        out_cls = out_obj = None
        if want_cls:
            f = self.linear1(t_cls)[0]
            out_cls = self.linear2(torch.cat([w_cls @ f, f], dim=-1))
        if want_obj:
            f = self.linear1_obj(t_reg)[0]
            out_obj = self.linear2_obj(torch.cat([w_obj @ f, f], dim=-1))
        return out_cls, out_obj


def _gather(rows_per_frame: Sequence[torch.Tensor], idx: Sequence[torch.Tensor], cls_feat: Sequence[torch.Tensor],
            reg_feat: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    cands = [rows[i] for rows, i in zip(rows_per_frame, idx)]
    f_cls = torch.cat(list(cls_feat))
    f_reg = torch.cat(list(reg_feat))
    score = torch.cat([c[:, 5] for c in cands])
    return cands, f_cls, f_reg, score


class _VideoHead(YOLOXHead):
    """The batch pipeline shared by both heads; subclasses give the selection and the refinement."""

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def refine(self, f_cls, f_reg, score) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def forward(self, feats: Sequence[torch.Tensor]) -> HeadOutput:
        """The detections of a batch of frames (the PAFPN outputs of B frames)."""
        decoded, stems, regs = self.still_parts(feats)
        snapshot = decoded.clone()
        rows = [corner_rows(d) for d in decoded]
        idx = [self.select(r) for r in rows]
        cands, f_cls, f_reg, score = _gather(rows, idx, self.cls2_at(stems, idx), self.reg_at(regs, idx))
        still = [still_detections(c) for c in cands]
        empty = [c.new_zeros((0, 7)) for c in cands]
        if len(feats[0]) == 1 or f_cls.shape[0] == 0:   # the official head returns still-image results
            single = self.single_frame(cands, still)
            return HeadOutput(snapshot, idx, single, single)
        logits, obj = self.refine(f_cls, f_reg, score)
        counts = [len(c) for c in cands]
        logits = logits.split(counts)
        objs = obj.split(counts) if obj is not None else [None] * len(cands)
        dets = [refined_detections(c, lg, o) if len(c) else e for c, lg, o, e in zip(cands, logits, objs, empty)]
        # the official postprocess returns no still detections for a frame without video detections
        still = [s if len(d) else e for s, d, e in zip(still, dets, empty)]
        return HeadOutput(snapshot, idx, dets, still)

    def single_frame(self, cands: List[torch.Tensor], still: List[torch.Tensor]) -> List[torch.Tensor]:
        return still


class YOLOVHead(_VideoHead):
    """YOLOV's head (official ``yolovp_msa.YOLOXHead``): ``trans`` (:class:`MSA`) and
    ``linear_pred`` (4C -> K + 1; the last output is unused); objectness stays the still one."""

    def __init__(self, num_classes: int, width: float, heads: int = 4, pre: int = 750, post: int = 30,
                 pre_nms: float = 0.75, sim_thresh: float = 0.75):
        super().__init__(num_classes, width)
        self.pre, self.post, self.pre_nms, self.sim_thresh = pre, post, pre_nms, sim_thresh
        self.trans = MSA(self.width, heads)
        self.linear_pred = nn.Linear(4 * self.width, num_classes + 1)

    def select(self, rows):
        return select_top_nms(rows, self.pre, self.post, self.pre_nms)

    def refine(self, f_cls, f_reg, score):
        feats, _ = self.trans(f_cls, f_reg, score, self.sim_thresh)
        return self.linear_pred(feats)[:, :self.num_classes], None


class YOLOVPPHead(_VideoHead):
    """YOLOV++'s head (official ``v_plus_head.YOLOVHead`` with ``agg_type='msa'``, ``reconf``,
    ``decouple_reg``): class features from ``agg``, objectness features from the box branch of
    ``agg_iou``; ``cls_pred`` (4C -> K) and ``obj_pred`` (4C -> 1) replace both scores."""

    def __init__(self, num_classes: int, width: float, heads: int = 4, minimal_limit: int = 0,
                 sim_thresh: float = 0.75, in_channels: Sequence[int] = (256, 512, 1024)):
        super().__init__(num_classes, width, in_channels)
        self.minimal_limit, self.sim_thresh = minimal_limit, sim_thresh
        self.agg = MSA(self.width, heads, reconf=True)
        self.agg_iou = MSA(self.width, heads, reconf=True)
        self.cls_pred = nn.Linear(4 * self.width, num_classes)
        self.obj_pred = nn.Linear(4 * self.width, 1)

    def select(self, rows):
        return select_by_score(rows, CONF_THRESH, self.minimal_limit)

    def refine(self, f_cls, f_reg, score):
        feats_cls, _ = self.agg(f_cls, f_reg, score, self.sim_thresh, want_cls=True)
        _, feats_obj = self.agg_iou(f_cls, f_reg, score, self.sim_thresh, want_cls=False, want_obj=True)
        return self.cls_pred(feats_cls), self.obj_pred(feats_obj).squeeze(-1)

    def single_frame(self, cands, still):
        """A one-frame batch: the official YOLOV++ head returns its candidates as they are."""
        return [c[:, :7] for c in cands]
