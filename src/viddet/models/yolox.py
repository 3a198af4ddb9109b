"""YOLOX, the one-stage still-image detector under YOLOV / YOLOV++ (Ge et al., "YOLOX: Exceeding YOLO
Series in 2021", arXiv 2107.08430), as the official YOLOV code (github.com/YuHengsss/YOLOV,
``yolox/models/{darknet,yolo_pafpn,network_blocks}.py``) builds it: CSPDarknet with depth / width
multipliers, PAFPN, and the decoupled head's still-image part with grid decoding. Written from those
semantics; attribute names follow the official modules so that its ``{"model": state_dict}`` files
load unchanged.

Also the official test-time preprocessing (:func:`letterbox`): raw 0..255 BGR, no normalisation.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from viddet.structures import ImageMeta

BN_EPS = 1e-3
"""BatchNorm eps of every YOLOX model (set by the official ``init_yolo``; not stored in checkpoints)."""
STRIDES = (8, 16, 32)
PAD_VALUE = 114


def letterbox(img_bgr: np.ndarray, size: int = 576) -> Tuple[torch.Tensor, ImageMeta]:
    """The official VID test preprocessing (``VIDDataset.pull_item`` + ``preproc``).

    ``r = min(size / h, size / w)`` (float64); cv2 ``INTER_LINEAR`` resize of the uint8 image to
    ``(int(w * r), int(h * r))``; pasted top-left on a ``size`` x ``size`` canvas of grey 114;
    HWC -> CHW float32 with values 0..255, BGR order, no mean/std.

    Args:
        img_bgr: (H, W, 3) uint8 BGR image (``cv2.imread``).
        size: the square input side in pixels (576 for every released YOLOV / YOLOV++ model).

    Returns:
        (tensor (3, size, size) float32, :class:`ImageMeta` with ``scale_factor`` = [r] * 4).

    Raises:
        ValueError: the image is not (H, W, 3).
    """
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3:
        raise ValueError(f'expected an (H, W, 3) BGR image, got shape {img_bgr.shape}')
    h, w = img_bgr.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = int(w * r), int(h * r)
    resized = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    tensor = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))).float()
    meta = ImageMeta(ori_shape=(h, w), img_shape=(new_h, new_w), pad_shape=(size, size),
                     scale_factor=np.array([r, r, r, r], dtype=np.float32))
    return tensor, meta


def letterbox_ratio(ori_shape: Sequence[int], size: int = 576) -> float:
    """The float64 ratio ``min(size / h, size / w)`` that boxes are divided by (original pixels)."""
    h, w = ori_shape
    return min(size / h, size / w)


class BaseConv(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d (eps 1e-3) -> SiLU; keys ``conv.*``, ``bn.*``.

    Shapes: (N, cin, H, W) -> (N, cout, H / stride, W / stride).
    """

    def __init__(self, cin: int, cout: int, ksize: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ksize, stride, (ksize - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Focus(nn.Module):
    """Space-to-depth (the four 2x2 phases stacked: top-left, bottom-left, top-right, bottom-right)
    then a 3x3 :class:`BaseConv`. (N, 3, H, W) -> (N, cout, H / 2, W / 2)."""

    def __init__(self, cin: int, cout: int, ksize: int = 3):
        super().__init__()
        self.conv = BaseConv(cin * 4, cout, ksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phases = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(torch.cat(phases, dim=1))


class Bottleneck(nn.Module):
    """1x1 then 3x3 :class:`BaseConv`, plus the input when ``shortcut`` (same channels)."""

    def __init__(self, channels: int, shortcut: bool = True):
        super().__init__()
        self.conv1 = BaseConv(channels, channels, 1)
        self.conv2 = BaseConv(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.shortcut else y


class CSPLayer(nn.Module):
    """CSP block (YOLOv5's C3): two 1x1 branches of ``cout / 2`` channels, ``n`` bottlenecks on the
    first, concatenated (first, second) and fused by a 1x1 conv. (N, cin, H, W) -> (N, cout, H, W)."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        hidden = int(cout * 0.5)
        self.conv1 = BaseConv(cin, hidden, 1)
        self.conv2 = BaseConv(cin, hidden, 1)
        self.conv3 = BaseConv(2 * hidden, cout, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, shortcut) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat((self.m(self.conv1(x)), self.conv2(x)), dim=1))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: 1x1 conv to cin / 2, max pools 5/9/13 (stride 1) concatenated with
    their input, 1x1 conv to cout."""

    def __init__(self, cin: int, cout: int, kernel_sizes: Sequence[int] = (5, 9, 13)):
        super().__init__()
        hidden = cin // 2
        self.conv1 = BaseConv(cin, hidden, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in kernel_sizes)
        self.conv2 = BaseConv(hidden * (len(kernel_sizes) + 1), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))


def _stage(cin: int, cout: int, n: int) -> nn.Sequential:
    return nn.Sequential(BaseConv(cin, cout, 3, 2), CSPLayer(cout, cout, n))


class CSPDarknet(nn.Module):
    """YOLOX's backbone: Focus stem then dark2..dark5 (stride 2 conv + CSP layers), channels
    64·w, 128·w, ..., 1024·w; CSP depths d, 3d, 3d, d with ``d = max(round(3 · depth), 1)``.

    Args:
        depth, width: the multipliers (S: 0.33, 0.5; L: 1, 1; X: 1.33, 1.25).

    Shapes: (N, 3, H, W) -> dark3, dark4, dark5 at strides 8, 16, 32.
    """

    def __init__(self, depth: float, width: float):
        super().__init__()
        c = int(width * 64)
        d = max(round(depth * 3), 1)
        self.stem = Focus(3, c, 3)
        self.dark2 = _stage(c, 2 * c, d)
        self.dark3 = _stage(2 * c, 4 * c, 3 * d)
        self.dark4 = _stage(4 * c, 8 * c, 3 * d)
        self.dark5 = nn.Sequential(BaseConv(8 * c, 16 * c, 3, 2), SPPBottleneck(16 * c, 16 * c),
                                   CSPLayer(16 * c, 16 * c, d, shortcut=False))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        return c3, c4, self.dark5(c4)


class PAFPN(nn.Module):
    """CSPDarknet (attribute ``backbone``) + YOLOX's path-aggregation FPN (official ``YOLOPAFPN``).

    Shapes: (N, 3, H, W) -> (N, 256w, H/8, W/8), (N, 512w, H/16, W/16), (N, 1024w, H/32, W/32).
    """

    def __init__(self, depth: float, width: float):
        super().__init__()
        c1, c2, c3 = int(256 * width), int(512 * width), int(1024 * width)
        n = round(3 * depth)
        self.backbone = CSPDarknet(depth, width)
        self.lateral_conv0 = BaseConv(c3, c2, 1)
        self.C3_p4 = CSPLayer(2 * c2, c2, n, False)
        self.reduce_conv1 = BaseConv(c2, c1, 1)
        self.C3_p3 = CSPLayer(2 * c1, c1, n, False)
        self.bu_conv2 = BaseConv(c1, c1, 3, 2)
        self.C3_n3 = CSPLayer(2 * c1, c2, n, False)
        self.bu_conv1 = BaseConv(c2, c2, 3, 2)
        self.C3_n4 = CSPLayer(2 * c2, c3, n, False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x2, x1, x0 = self.backbone(x)
        top0 = self.lateral_conv0(x0)
        p4 = self.C3_p4(torch.cat([F.interpolate(top0, scale_factor=2.0, mode='nearest'), x1], 1))
        top1 = self.reduce_conv1(p4)
        out2 = self.C3_p3(torch.cat([F.interpolate(top1, scale_factor=2.0, mode='nearest'), x2], 1))
        out1 = self.C3_n3(torch.cat([self.bu_conv2(out2), top1], 1))
        out0 = self.C3_n4(torch.cat([self.bu_conv1(out1), top0], 1))
        return out2, out1, out0


def _tower(c: int) -> nn.Sequential:
    return nn.Sequential(BaseConv(c, c, 3), BaseConv(c, c, 3))


def decode_grid(raw: torch.Tensor, sizes: Sequence[Tuple[int, int]], strides: Sequence[int] = STRIDES) -> torch.Tensor:
    """YOLOX grid decoding (official ``decode_outputs``), in place on ``raw`` and returned.

    ``raw`` (B, A, 5 + K): per anchor (level order, row-major within a level) dx, dy, dw, dh, then
    already-sigmoided obj and K class scores. Output columns 0..3 become
    ``cx = (dx + gx) · s``, ``cy = (dy + gy) · s``, ``w = exp(dw) · s``, ``h = exp(dh) · s`` in input pixels.
    """
    grids, strides_all = [], []
    for (h, w), s in zip(sizes, strides):
        yv, xv = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
        grids.append(torch.stack((xv, yv), 2).view(1, -1, 2))
        strides_all.append(torch.full((1, h * w, 1), s))
    grid = torch.cat(grids, 1).to(raw.dtype).to(raw.device)
    stride = torch.cat(strides_all, 1).to(raw.dtype).to(raw.device)
    raw[..., :2] = (raw[..., :2] + grid) * stride
    raw[..., 2:4] = torch.exp(raw[..., 2:4]) * stride
    return raw


def flat_anchors(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level maps (B, C, H_l, W_l) -> (B, A, C), anchors in level order, row-major within a level.
    Channels-last maps are concatenated location-major (one contiguous copy: a view of each map);
    others channel-major, the result a transposed view."""
    if all(m.permute(0, 2, 3, 1).is_contiguous() for m in maps):
        return torch.cat([m.permute(0, 2, 3, 1).flatten(1, 2) for m in maps], 1)
    return torch.cat([m.flatten(2) for m in maps], 2).permute(0, 2, 1)


class YOLOXHead(nn.Module):
    """The decoupled head's still-image part plus the video heads' second class tower
    (``cls_convs2``, whose features YOLOV / YOLOV++ aggregate), three levels (strides 8/16/32).

    Args:
        num_classes: K (30 for ImageNet VID).
        width: the width multiplier; C = 256 · width channels.
        in_channels: the three input levels' channels before ``width`` (the official head's
            ``in_channels``: 256, 512, 1024 after a CSPDarknet; the neck's for YOLOV++'s
            transformer backbones, :mod:`viddet.models.yolov_backbones`).
    """

    def __init__(self, num_classes: int, width: float, in_channels: Sequence[int] = (256, 512, 1024)):
        super().__init__()
        c = int(256 * width)
        self.num_classes = num_classes
        self.width = c
        self.stems = nn.ModuleList(BaseConv(int(cin * width), c, 1) for cin in in_channels)
        self.cls_convs = nn.ModuleList(_tower(c) for _ in STRIDES)
        self.reg_convs = nn.ModuleList(_tower(c) for _ in STRIDES)
        self.cls_convs2 = nn.ModuleList(_tower(c) for _ in STRIDES)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for _ in STRIDES)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4, 1) for _ in STRIDES)
        self.obj_preds = nn.ModuleList(nn.Conv2d(c, 1, 1) for _ in STRIDES)

    def still(self, feats: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The still-image predictions and the features the video heads aggregate.

        Args:
            feats: the three PAFPN outputs.

        Returns:
            (decoded (B, A, 5 + K): cx, cy, w, h (input pixels), sigmoid obj, K sigmoid class
            scores; cls features (B, A, C) of ``cls_convs2``; reg features (B, A, C) of
            ``reg_convs``), A = sum of H_l · W_l over the levels.
        """
        decoded, stems, regs = self.still_parts(feats)
        return decoded, self._cls2(stems).permute(0, 2, 1), flat_anchors(regs)

    def still_parts(self, feats: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """:meth:`still` without the ``cls_convs2`` features: (decoded (B, A, 5 + K), the ``stems``
        outputs (B, C, H_l, W_l) and the ``reg_convs`` features (B, C, H_l, W_l) of the three
        levels: :meth:`cls2_at` and :meth:`reg_at` take what they need of them)."""
        outs: List[torch.Tensor] = []
        stems: List[torch.Tensor] = []
        regs: List[torch.Tensor] = []
        for k, x in enumerate(feats):
            x, reg_feat, box = self.box_level(k, x)
            stems.append(x)
            regs.append(reg_feat)
            cls = self.cls_preds[k](self.cls_convs[k](x))
            outs.append(torch.cat([box[:, :4], box[:, 4:].sigmoid(), cls.sigmoid()], 1))
        sizes = [tuple(o.shape[-2:]) for o in outs]
        return decode_grid(flat_anchors(outs), sizes), stems, regs

    def box_level(self, k: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The box branch of level ``k`` on its PAFPN map x (B, C_in, H, W): (the ``stems`` output
        (B, C, H, W), the ``reg_convs`` features (B, C, H, W), box and objectness logits (B, 5, H, W):
        dx, dy, dw, dh, obj)."""
        x = self.stems[k](x)
        reg_feat = self.reg_convs[k](x)
        return x, reg_feat, torch.cat([self.reg_preds[k](reg_feat), self.obj_preds[k](reg_feat)], 1)

    def reg_at(self, regs: Sequence[torch.Tensor], idx: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The ``reg_convs`` features of the anchors ``idx[b]`` (indices into the A anchors, level
        order) of each frame b, from the maps of :meth:`still_parts`: B tensors (n_b, C)."""
        flat = flat_anchors(regs)
        return [flat[b, i] for b, i in enumerate(idx)]

    def cls2_at(self, stems: Sequence[torch.Tensor], idx: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The ``cls_convs2`` features of the anchors ``idx[b]`` (indices into the A anchors, level
        order) of each frame b, from the ``stems`` outputs of :meth:`still_parts`: B tensors (n_b, C)."""
        cls2 = self._cls2(stems)
        return [cls2[b, :, i].t() for b, i in enumerate(idx)]

    def _cls2(self, stems: Sequence[torch.Tensor]) -> torch.Tensor:
        """``cls_convs2`` over every anchor: (B, C, A)."""
        return torch.cat([self.cls_convs2[k](x).flatten(2) for k, x in enumerate(stems)], 2)
