"""Plain data types passed between viddet's stages: image metadata and per-frame detections."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class ImageMeta:
    """Geometry of one preprocessed frame (MMTracking's ``img_metas`` entries).

    Attributes:
        ori_shape: (height, width) of the decoded frame, pixels.
        img_shape: (height, width) after the keep-ratio resize, before padding, pixels.
        pad_shape: (height, width) after zero-padding to a multiple of 16, pixels.
        scale_factor: float32 array [w_scale, h_scale, w_scale, h_scale] with
            w_scale = new_w / ori_w computed from the integer sizes (mmdet ``Resize``).
        flip: whether the frame was flipped horizontally (training augmentation only).
    """

    ori_shape: Tuple[int, int]
    img_shape: Tuple[int, int]
    pad_shape: Tuple[int, int]
    scale_factor: np.ndarray
    flip: bool = False


@dataclass
class Detections:
    """The detections of one frame, in original-image pixels.

    Attributes:
        boxes: (n, 4) float32 tensor of (x1, y1, x2, y2) in original-image pixels.
        scores: (n,) float32 tensor, class probability of each box.
        labels: (n,) int64 tensor, 0-based class index into the model's class names.
        track_ids: optional (n,) int64 tensor, the track (or Seq-NMS tube) of each box, unique within
            the video; -1 = no track. ``None`` (the default) when no linking was done
            (see :mod:`viddet.linking`).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    track_ids: Optional[torch.Tensor] = None

    @staticmethod
    def empty(device=None, with_tracks: bool = False) -> 'Detections':
        """An empty result (no boxes); with an empty ``track_ids`` tensor if ``with_tracks``."""
        return Detections(torch.zeros((0, 4), device=device), torch.zeros((0,), device=device),
                          torch.zeros((0,), dtype=torch.int64, device=device),
                          torch.zeros((0,), dtype=torch.int64, device=device) if with_tracks else None)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device) -> 'Detections':
        """Moves every tensor (``track_ids`` too, when present) to ``device``."""
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device),
                          None if self.track_ids is None else self.track_ids.to(device))

    def to_mmtracking(self, num_classes: int) -> List[np.ndarray]:
        """MMTracking's ``bbox2result`` layout: one (n_c, 5) float32 array per class."""
        arr = torch.cat([self.boxes, self.scores[:, None]], 1).detach().cpu().numpy()
        labels = self.labels.cpu().numpy()
        return [arr[labels == c] for c in range(num_classes)]
