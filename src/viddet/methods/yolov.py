"""YOLOV (Shi et al., AAAI 2023) and YOLOV++ (Shi et al., IJCV 2025): a YOLOX one-stage detector
whose few candidates per frame attend to the candidates of the other frames of a batch
(:mod:`viddet.models.yolov_head`), computing what the official code (github.com/YuHengsss/YOLOV)
computes in its VID evaluation (``tools/val_to_imdb.py``).

Offline (the official evaluation): a video of fewer than ``gframe`` (32) frames is one batch, in
frame order, in which every frame attends to all; a longer one is cut into batches of ``gframe``
frames (and a shorter tail) after a permutation of its frames drawn with
``numpy.random.default_rng(shuffle_seed).permutation(length)`` — reproducible, where the official
code uses an unseeded ``random.shuffle``. A batch of at most 4 frames gives the still-image
detections of its candidates (as ``val_to_imdb.py`` does). Each batch is computed once, when the
engine reaches its first frame; the detections of its other frames wait for their turn.

Preprocessing: :func:`viddet.models.yolox.letterbox` (576 x 576, grey 114, raw 0..255 BGR), not the
Faster R-CNN methods' resize + normalisation. Boxes are the model's divided by the float64 ratio;
with ``clip`` (default) they are then clipped to the image and empty ones dropped, as the official
converter (``val_to_imdb.to_repp_heavy``) does before evaluation. Every detection is kept (no
per-frame cap).

Online mode and training are not implemented yet (``viddet`` refuses them with a clear message).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Mapping, Tuple

import numpy as np
import torch
from torch import nn

from viddet.errors import VidDetError
from viddet.methods.base import MethodSettings, VIDMethod, at_least
from viddet.models.yolov_head import HeadOutput, YOLOVHead, YOLOVPPHead
from viddet.models.yolox import PAFPN, letterbox, letterbox_ratio
from viddet.structures import Detections

VARIANTS: Dict[str, Tuple[float, float]] = {'yolox_s': (0.33, 0.5), 'yolox_l': (1.0, 1.0), 'yolox_x': (1.33, 1.25)}
"""YOLOX variants: name -> (depth, width) multipliers of the official exp files."""
INPUT_SIZE = 576
STILL_BATCH = 4
"""Batches of at most this many frames give the still-image detections (``val_to_imdb.py``)."""


@dataclass
class YOLOVSettings(MethodSettings):
    """YOLOV's / YOLOV++'s inference settings (the official VID evaluation's)."""
    clip: bool = field(default=True, metadata={
        'help': 'YOLOV: clip boxes to the image and drop empty ones (the official converter)'})
    gframe: int = field(default=32, metadata={
        'help': 'YOLOV: frames per batch; a shorter video is one batch in which every frame attends to all'})
    shuffle_seed: int = field(default=0, metadata={
        'help': 'YOLOV: seed of the frame permutation that splits a longer video into batches'})

    def __post_init__(self):
        at_least(self, 1, 'gframe')
        at_least(self, 0, 'shuffle_seed')


def variant_of_state(state: Mapping[str, torch.Tensor]) -> str:
    """The YOLOX variant of a state dict: width from the stem conv's output channels (64 · width),
    checked against the depth (the bottlenecks of ``dark2``'s CSP layer, max(round(3 · depth), 1)).

    Raises:
        VidDetError: no CSPDarknet stem, or a width / depth pair of no known variant.
    """
    stem = state.get('backbone.backbone.stem.conv.conv.weight')
    if stem is None:
        raise VidDetError('not a YOLOX checkpoint: no backbone.backbone.stem.conv.conv.weight')
    blocks = {int(m.group(1)) for k in state if (m := re.match(r'backbone\.backbone\.dark2\.1\.m\.(\d+)\.', k))}
    for name, (depth, width) in VARIANTS.items():
        if int(64 * width) == stem.shape[0] and max(round(3 * depth), 1) == len(blocks):
            return name
    raise VidDetError(f'a YOLOX backbone with {stem.shape[0]} stem channels and {len(blocks)} dark2 blocks '
                      f'is none of {", ".join(VARIANTS)}')


def video_batches(length: int, gframe: int, seed: int) -> List[List[int]]:
    """The batches of a video of ``length`` frames: one batch in frame order when length < gframe,
    else the frames of a seeded permutation cut into batches of ``gframe`` and a tail."""
    if length < gframe:
        return [list(range(length))]
    perm = np.random.default_rng(seed).permutation(length).tolist()
    return [perm[i:i + gframe] for i in range(0, length, gframe)]


def clip_detections(det: Detections, height: int, width: int) -> Detections:
    """Boxes clipped to [0, width] x [0, height] and empty ones dropped (``to_repp_heavy``)."""
    b = det.boxes.clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return Detections(b[keep], det.scores[keep], det.labels[keep])


class _YOLOVFamily(VIDMethod):
    """What YOLOV and YOLOV++ share: ``backbone`` (CSPDarknet + PAFPN) and ``head``, the batching
    over a video, preprocessing and the conversion to original-image detections."""

    paper: ClassVar[str] = ''
    Settings = YOLOVSettings
    trainable = False

    def __init__(self, backbone: nn.Module, head: nn.Module, variant: str, gframe: int = 32,
                 shuffle_seed: int = 0, clip: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.variant = variant
        self.gframe, self.shuffle_seed, self.clip = gframe, shuffle_seed, clip
        self._batch_of: Dict[int, List[int]] = {}
        self._results: Dict[int, Detections] = {}

    # ------------------------------------------------------------------ construction
    head_class: ClassVar[type]

    @classmethod
    def head_options(cls, variant: str) -> dict:
        """Keyword arguments of ``head_class`` that depend on the variant (official exp files)."""
        return {}

    @classmethod
    def make_head(cls, variant: str, num_classes: int) -> nn.Module:
        return cls.head_class(num_classes, VARIANTS[variant][1], **cls.head_options(variant))

    @classmethod
    def build(cls, backbone: str = 'yolox_s', num_classes: int = 30, **settings) -> '_YOLOVFamily':
        """A new model; ``backbone`` is a YOLOX variant (``yolox_s``, ``yolox_l``, ``yolox_x``).

        Raises:
            VidDetError: another backbone name.
        """
        if backbone not in VARIANTS:
            raise VidDetError(f'{cls.title} runs on a YOLOX backbone ({", ".join(VARIANTS)}), not {backbone!r}')
        depth, width = VARIANTS[backbone]
        return cls(PAFPN(depth, width), cls.make_head(backbone, num_classes), backbone, **settings)

    @classmethod
    def build_for_checkpoint(cls, backbone, num_classes, state, **settings) -> '_YOLOVFamily':
        """The model of the variant the file holds (:func:`variant_of_state`); a YOLOX backbone
        name given explicitly must be that one.

        Raises:
            VidDetError: the file's variant differs from an explicitly named YOLOX backbone.
        """
        variant = variant_of_state(state)
        if backbone in VARIANTS and backbone != variant:
            raise VidDetError(f'the checkpoint holds a {cls.title} {variant} model, not {backbone}')
        return cls.build(variant, num_classes, **settings)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def backbone(self) -> nn.Module:
        """The CSPDarknet + PAFPN (state-dict prefix ``backbone.``)."""
        return self._modules['backbone']

    def configure_training(self, model_cfg) -> None:
        """Raises VidDetError: training is not implemented yet."""
        raise VidDetError(f'training {self.title} is not implemented in viddet yet (inference only)')

    def losses(self, sample, cfg):
        raise NotImplementedError(f'training {self.title} is not implemented in viddet yet (inference only)')

    # ------------------------------------------------------------------ inference
    def prepare(self, image: np.ndarray, scale=None):
        """The official letterbox preprocessing (``scale`` is ignored: the input is 576 x 576)."""
        return letterbox(image, INPUT_SIZE)

    def forward(self, imgs: torch.Tensor) -> HeadOutput:
        """Everything the model computes for a batch of frames (B, 3, 576, 576) that attend to one
        another (:class:`viddet.models.yolov_head.HeadOutput`, boxes in input pixels)."""
        return self.head(self.backbone(imgs))

    def reset(self) -> None:
        self._batch_of, self._results = {}, {}

    def _plan(self, ctx) -> None:
        if ctx.length is None:    # a stream of unknown length: read up to gframe frames ahead
            ctx.frame(ctx.current + self.gframe)
        if ctx.length is None:
            raise VidDetError(f'offline {self.title} needs the video length to split it into batches of '
                              f'{self.gframe} frames: use a file or folder source, or --mode online')
        for batch in video_batches(ctx.length, self.gframe, self.shuffle_seed):
            for i in batch:
                self._batch_of[i] = batch

    def _frames(self, batch: List[int], ctx) -> list:
        near = ctx.current + self.gframe
        return [ctx.frame(i) if ctx.current <= i < near else ctx.fetch(i) for i in batch]

    def _run_batch(self, batch: List[int], ctx) -> None:
        frames = self._frames(batch, ctx)
        imgs = torch.cat([f.img for f in frames])
        with ctx.timer('backbone'):
            feats = self.backbone(imgs)
        with ctx.timer('head'):
            out = self.head(feats)
        rows = out.still if len(batch) <= STILL_BATCH else out.detections
        for f, r in zip(frames, rows):
            h, w = f.meta.ori_shape
            det = Detections(r[:, :4] / letterbox_ratio((h, w), INPUT_SIZE), r[:, 4] * r[:, 5], r[:, 6].long())
            self._results[f.index] = clip_detections(det, h, w) if self.clip else det

    def predict(self, frame, ctx) -> Detections:
        """The detections of ``frame`` (original-image pixels, all of them, descending score).

        Raises:
            VidDetError: online mode (not implemented yet), or a stream of unknown length.
        """
        if ctx.mode != 'offline':
            raise VidDetError(f'{self.title} runs offline only for now (the official evaluation): use --mode offline')
        if not self._batch_of:
            self._plan(ctx)
        if frame.index not in self._results:
            self._run_batch(self._batch_of[frame.index], ctx)
        return self._results.pop(frame.index)


class YOLOV(_YOLOVFamily):
    """YOLOV: YOLOX + :class:`viddet.models.yolov_head.YOLOVHead` (top-750 / NMS 0.75 / 30
    candidates per frame, refined classification)."""

    name = 'yolov'
    title = 'YOLOV'
    paper = 'Shi et al., YOLOV: Making Still Image Object Detectors Great at Video Object Detection, AAAI 2023'
    signature = ('backbone.backbone.stem.', 'head.trans.')
    head_class = YOLOVHead


class YOLOVPP(_YOLOVFamily):
    """YOLOV++: YOLOX + :class:`viddet.models.yolov_head.YOLOVPPHead` (candidates by
    obj · cls >= 0.001, at least 50 for L / X, refined classification and objectness)."""

    name = 'yolovpp'
    title = 'YOLOV++'
    paper = 'Shi et al., Practical Video Object Detection via Feature Selection and Aggregation (YOLOV++), IJCV 2025'
    signature = ('backbone.backbone.stem.', 'head.agg.')
    head_class = YOLOVPPHead

    @classmethod
    def head_options(cls, variant):
        """``minimal_limit``: 0 for S (``v++_base_decoupleReg.py``), 50 for L (``v++_large_decoupleReg.py``)."""
        return {'minimal_limit': 0 if variant == 'yolox_s' else 50}
