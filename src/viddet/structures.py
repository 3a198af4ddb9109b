"""Plain data types passed between viddet's stages: image metadata, per-frame detections and
training samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from viddet.errors import VidDetError


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
        ref_gt_bboxes, ref_gt_labels: the ground truth of each reference frame, R tensors like
            ``gt_bboxes`` / ``gt_labels`` (None when the data did not provide it; YOLOV needs it).
    """
    img: torch.Tensor
    ref_imgs: torch.Tensor
    metas: List[ImageMeta]
    gt_bboxes: torch.Tensor
    gt_labels: torch.Tensor
    is_video_data: bool = True
    seed: Optional[int] = None
    ref_gt_bboxes: Optional[List[torch.Tensor]] = None
    ref_gt_labels: Optional[List[torch.Tensor]] = None

    def to(self, device) -> 'TrainSample':
        """Moves the tensors to ``device``."""
        def moved(ts):
            return None if ts is None else [t.to(device) for t in ts]
        return TrainSample(self.img.to(device), self.ref_imgs.to(device), self.metas,
                           self.gt_bboxes.to(device), self.gt_labels.to(device), self.is_video_data, self.seed,
                           moved(self.ref_gt_bboxes), moved(self.ref_gt_labels))

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


def check_detections(det, where: str) -> None:
    """Checks one frame's detections: a :class:`Detections` with (n, 4) finite boxes, (n,) finite
    scores, (n,) labels and, if present, (n,) track ids.

    Raises:
        VidDetError: ``"<where>: <problem>"``.
    """
    if not isinstance(det, Detections):
        raise VidDetError(f'{where}: expected viddet.structures.Detections, got {type(det).__name__}')
    for name in ('boxes', 'scores', 'labels'):
        if not isinstance(getattr(det, name), torch.Tensor):
            raise VidDetError(f'{where}: {name} must be a torch.Tensor, got {type(getattr(det, name)).__name__}')
    if det.boxes.dim() != 2 or det.boxes.shape[1] != 4:
        raise VidDetError(f'{where}: boxes must have shape (n, 4), got {tuple(det.boxes.shape)}')
    n = det.boxes.shape[0]
    for name in ('scores', 'labels') + (('track_ids',) if det.track_ids is not None else ()):
        t = getattr(det, name)
        if tuple(t.shape) != (n,):
            raise VidDetError(f'{where}: {name} must have shape ({n},) like the boxes, got {tuple(t.shape)}')
    if n and not (bool(torch.isfinite(det.boxes).all()) and bool(torch.isfinite(det.scores).all())):
        raise VidDetError(f'{where}: boxes and scores must be finite (found NaN or inf)')
    if n and det.labels.is_floating_point():
        raise VidDetError(f'{where}: labels must be integers, got {det.labels.dtype}')
