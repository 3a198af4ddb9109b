"""Feature warping by optical flow, numerically as MMTracking 0.14 ``flow_warp_feats``
(``mmtrack/core/motion/flow.py``): DFF propagates the key frame's features this way, FGFA warps
its window to the current frame (Zhu et al., "Deep Feature Flow for Video Recognition", CVPR
2017, §3; "Flow-Guided Feature Aggregation for Video Object Detection", ICCV 2017, §3.2: bilinear
warping of the neighbour frame's features towards the current frame). The flow comes from
:class:`viddet.models.flownet.FlowNetSimple`.

Parity trap reproduced on purpose (do not "fix" it; the checkpoints were trained with it):
``flow_warp_feats`` resizes the flow to the feature map with a scale factor computed from the
widths only, then normalises the sampling grid with ``/W*2-1`` (not ``/(W-1)``) while
``grid_sample`` uses ``align_corners=True``: even a zero flow samples at ``p*(W-1)/W``, a slight
contraction towards the top-left corner (up to ~1 feature cell at the right/bottom border).
Coordinates beyond the map are clamped ('border' padding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['flow_warp_feats', 'resize_flow', 'warp_feats', 'warp_grid', 'feature_grid']


def flow_warp_feats(feats: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warps feature maps with a full-resolution flow, exactly as MMTracking ``flow_warp_feats``.

    MMTracking 0.14 ``mmtrack/core/motion/flow.py``, ``flow_warp_feats``.

    1. ``s = W_feat / W_flow`` (from the widths only, e.g. 63/1008 = 1/16); the flow is resized with
       ``F.interpolate(scale_factor=s, mode='bilinear', align_corners=False)`` and multiplied by s.
    2. grid = (w + flow_x, h + flow_y) in feature cells.
    3. Normalised with ``gx = grid_x / W * 2 - 1`` and ``gy = grid_y / H * 2 - 1`` and sampled with
       ``F.grid_sample(bilinear, padding_mode='border', align_corners=True)``.

    Parity trap: because step 3 divides by W but samples with ``align_corners=True``, the feature
    actually read for output cell (h, w) is at ``((w + fx) * (W - 1) / W, (h + fy) * (H - 1) / H)``,
    clamped to [0, W-1] x [0, H-1]. Zero flow is therefore *not* the identity; it is kept because
    the checkpoints were trained with it.

    Args:
        feats: (N, C, H, W) source-frame features (e.g. 512 x Hp/16 x Wp/16).
        flow: (N, 2, H_f, W_f) flow in full-resolution pixels, channel 0 = x, channel 1 = y, as
            returned by :meth:`viddet.models.flownet.FlowNetSimple.forward` (H_f = 16 H and W_f =
            16 W in the pipeline).

    Returns:
        (N, C, H, W) features warped to the target frame.

    Raises:
        ValueError: on wrong ranks, a flow without 2 channels, or mismatched batch sizes.
    """
    if feats.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f'flow_warp_feats expects feats (N, C, H, W) and flow (N, 2, H, W), got '
                         f'{tuple(feats.shape)} and {tuple(flow.shape)}')
    if feats.shape[0] != flow.shape[0]:
        raise ValueError(f'flow_warp_feats: {feats.shape[0]} feature maps for {flow.shape[0]} flows')
    return warp_feats(feats, resize_flow(flow, feats.shape[-2:]))


def resize_flow(flow: torch.Tensor, feat_size) -> torch.Tensor:
    """Step 1 of :func:`flow_warp_feats`: (N, 2, H_f, W_f) flow in image pixels -> (N, 2, H, W)
    flow in feature cells (``F.interpolate(scale_factor=s, bilinear, align_corners=False) * s``,
    ``s = W / W_f``).

    Raises:
        ValueError: if the resized flow is not (H, W) = ``feat_size``.
    """
    H, W = int(feat_size[0]), int(feat_size[1])
    scale = float(W) / flow.shape[-1]
    flow = F.interpolate(flow, scale_factor=scale, mode='bilinear', align_corners=False)
    flow = flow * scale
    if flow.shape[-2:] != (H, W):
        raise ValueError(f'flow of size {tuple(flow.shape[-2:])} after scaling by W ratio {scale} '
                         f'does not match the feature size {(H, W)}')
    return flow


def warp_feats(feats: torch.Tensor, feat_flow: torch.Tensor) -> torch.Tensor:
    """Steps 2-3 of :func:`flow_warp_feats`: warps (N, C, H, W) feature maps with a flow already
    on their grid, (N, 2, H, W) in feature cells (:func:`resize_flow`,
    :meth:`viddet.models.flownet.FlowNetSimple.feature_flow`).

    Raises:
        ValueError: on wrong ranks or sizes, or mismatched batch sizes.
    """
    if feats.dim() != 4 or feat_flow.dim() != 4 or feat_flow.shape[1] != 2 \
            or feat_flow.shape[-2:] != feats.shape[-2:] or feat_flow.shape[0] != feats.shape[0]:
        raise ValueError(f'warp_feats expects feats (N, C, H, W) and a flow (N, 2, H, W) on their grid, '
                         f'got {tuple(feats.shape)} and {tuple(feat_flow.shape)}')
    grid = feature_grid(feat_flow)
    return F.grid_sample(feats, grid.to(feats.dtype), mode='bilinear', padding_mode='border',
                         align_corners=True)


def warp_grid(flow: torch.Tensor, feat_size) -> torch.Tensor:
    """The normalised sampling grid (N, H, W, 2) of :func:`flow_warp_feats` (its steps 1-3):
    ``grid_sample`` coordinates in [-1, 1], last dim (x, y)."""
    return feature_grid(resize_flow(flow, feat_size))


def feature_grid(feat_flow: torch.Tensor) -> torch.Tensor:
    """Steps 2-3 of :func:`flow_warp_feats` for a (N, 2, H, W) flow in feature cells: the
    ``grid_sample`` grid (N, H, W, 2) in [-1, 1], last dim (x, y)."""
    flow = feat_flow
    H, W = flow.shape[-2:]
    ys = torch.arange(H, device=flow.device).to(flow.dtype).view(1, H, 1)
    xs = torch.arange(W, device=flow.device).to(flow.dtype).view(1, 1, W)
    gx = (xs + flow[:, 0]) / W * 2 - 1
    gy = (ys + flow[:, 1]) / H * 2 - 1
    return torch.stack((gx, gy), dim=-1)  # (N, H, W, 2), last dim (x, y)
