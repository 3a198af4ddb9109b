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

Online (causal, for streams and cameras): each frame attends to the candidates of a bounded memory
of the ``memory`` (31 = gframe - 1) frames before it, plus its own: the memory keeps, per past frame,
only what the aggregation reads (candidate rows, their ``cls_convs2`` / ``reg_convs`` features), so
its size does not grow with the video and no frame is read ahead. The detections of frame t are
exactly what the offline head computes for frame t in a batch of frames [t - memory, t] (the head's
own rules: a one-frame batch, frame 0 or ``memory`` 0, gives the head's single-frame results; longer
ones the aggregated detections, no still-image rule for small batches), without recomputing the past
frames' backbones: the aggregation itself (every candidate of the window attends to all, the
references' features included) is recomputed per frame, as an offline batch of that window would.
The official code's own online demo (``tools/yolov_demo_online.py``, YOLOV only) differs: see
``docs/yolov.md``.
"""
from __future__ import annotations

import dataclasses
import re
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Deque, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from viddet.errors import VidDetError
from viddet.methods.base import MethodSettings, VIDMethod, at_least
from viddet.models.yolov_head import (HeadOutput, YOLOVHead, YOLOVPPHead, corner_rows, refined_detections,
                                       still_detections)
from viddet.models.yolov_backbones import TRANSFORMERS, transformer_of_state, transformer_pafpn
from viddet.models.yolov_mobilenet import NAME as MOBILENET, is_mobilenet_state, mobilenet_pafpn
from viddet.models.yolov_loss import freeze_still_parts, init_score_biases, sample_losses, train_letterbox
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
    memory: int = field(default=31, metadata={
        'help': 'YOLOV online: past frames whose candidates each frame attends to (gframe - 1)'})

    def __post_init__(self):
        at_least(self, 1, 'gframe')
        at_least(self, 0, 'shuffle_seed', 'memory')


def variant_of_state(state: Mapping[str, torch.Tensor]) -> str:
    """The YOLOX variant of a state dict: width from the stem conv's output channels (64 · width),
    checked against the depth (the bottlenecks of ``dark2``'s CSP layer, max(round(3 · depth), 1));
    or YOLOV++'s transformer backbone (:func:`viddet.models.yolov_backbones.transformer_of_state`);
    or ``mobilenetv2`` (:mod:`viddet.models.yolov_mobilenet`: ``backbone.backbone.features.*``).

    Raises:
        VidDetError: no CSPDarknet stem, or a width / depth pair of no known variant.
    """
    if 'backbone.backbone.patch_embed.proj.weight' in state:
        return transformer_of_state(state)
    if is_mobilenet_state(state):
        return MOBILENET
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


@dataclass
class FrameCandidates:
    """One frame's candidates, what the aggregation reads of it (and all the online memory keeps).

    Attributes:
        rows: (n, 7 + K) candidate rows (:func:`viddet.models.yolov_head.corner_rows` at the
            selected anchors): x1, y1, x2, y2 in input pixels, obj, max cls, label, K class scores.
        cls_feat: (n, C) ``cls_convs2`` features at the candidates' anchors.
        reg_feat: (n, C) ``reg_convs`` features at the candidates' anchors.
    """
    rows: torch.Tensor
    cls_feat: torch.Tensor
    reg_feat: torch.Tensor


def frame_candidates(head: nn.Module, feats: Sequence[torch.Tensor]) -> FrameCandidates:
    """The candidates of one frame (PAFPN outputs of a batch of 1) as the video head selects them
    (``head.select``: YOLOV top-750 / NMS / 30, YOLOV++ obj · cls >= 0.001); they do not depend on
    the other frames of a batch. The ``cls_convs2`` features come from ``head.cls2_at``, as in the
    head's batch forward (a fast head computes them at the candidates only)."""
    decoded, stems, regs = head.still_parts(feats)
    rows = corner_rows(decoded[0])
    idx = head.select(rows)
    return FrameCandidates(rows[idx], head.cls2_at(stems, [idx])[0], head.reg_at(regs, [idx])[0])


def last_frame_detections(head: nn.Module, window: Sequence[FrameCandidates]) -> torch.Tensor:
    """The detections the video head computes for the last frame of a batch whose frames have these
    candidates (oldest first), as ``head(batch).detections[-1]`` would: (m, 7) rows x1, y1, x2, y2
    (input pixels), obj, cls, label in descending score.

    A one-frame window, or one without any candidate, gives the head's single-frame results
    (``head.single_frame``); otherwise every candidate of the window attends to all
    (``head.refine``) and the last frame's refined rows go through the final selection and NMS.
    """
    current = window[-1]
    n = len(current.rows)
    if len(window) == 1 or sum(len(c.rows) for c in window) == 0:
        return head.single_frame([current.rows], [still_detections(current.rows)])[0]
    if n == 0:
        return current.rows.new_zeros((0, 7))
    logits, obj = head.refine(torch.cat([c.cls_feat for c in window]), torch.cat([c.reg_feat for c in window]),
                              torch.cat([c.rows[:, 5] for c in window]))
    return refined_detections(current.rows, logits[-n:], None if obj is None else obj[-n:])


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
    trainable = True
    train_transform = train_letterbox
    per_frame_augment = True
    train_backbones = (*VARIANTS, MOBILENET)
    class_specific_prefixes = ('head.cls_preds.', 'head.linear_pred.', 'head.cls_pred.')

    def __init__(self, backbone: nn.Module, head: nn.Module, variant: str, gframe: int = 32,
                 shuffle_seed: int = 0, clip: bool = True, memory: int = 31):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.variant = variant
        self.gframe, self.shuffle_seed, self.clip, self.memory = gframe, shuffle_seed, clip, memory
        self.reset()

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
        """A new model; ``backbone`` is a YOLOX variant (``yolox_s``, ``yolox_l``, ``yolox_x``), or
        ``mobilenetv2`` (:func:`viddet.models.yolov_mobilenet.mobilenet_pafpn`: an ImageNet MobileNetV2
        body under YOLOV-S's neck and head; not an official model).

        Raises:
            VidDetError: another backbone name.
        """
        if backbone == MOBILENET:
            return cls(mobilenet_pafpn(), cls.make_head('yolox_s', num_classes), backbone, **settings)
        if backbone not in VARIANTS:
            raise VidDetError(f'{cls.title} runs on a YOLOX backbone ({", ".join(VARIANTS)}) or {MOBILENET}, '
                              f'not {backbone!r}')
        depth, width = VARIANTS[backbone]
        return cls(PAFPN(depth, width), cls.make_head(backbone, num_classes), backbone, **settings)

    @classmethod
    def build_for_checkpoint(cls, backbone, num_classes, state, **settings) -> '_YOLOVFamily':
        """The model of the variant the file holds (:func:`variant_of_state`); a backbone of the
        family (YOLOX variant, transformer, ``mobilenetv2``) given explicitly must be that one.

        Raises:
            VidDetError: the file's variant differs from an explicitly named backbone of the family.
        """
        variant = variant_of_state(state)
        if backbone in (*VARIANTS, *TRANSFORMERS, MOBILENET) and backbone != variant:
            raise VidDetError(f'the checkpoint holds a {cls.title} {variant} model, not {backbone}')
        return cls.build(variant, num_classes, **settings)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def backbone(self) -> nn.Module:
        """The body (CSPDarknet, a transformer or MobileNetV2) + PAFPN (state-dict prefix ``backbone.``)."""
        return self._modules['backbone']

    @property
    def imagenet_body(self) -> nn.Module:
        """What ``init.backbone_weights`` initialise: the ``mobilenetv2`` body alone (torchvision's ImageNet
        MobileNetV2; the PAFPN keeps its initialisation), else the whole backbone."""
        return self.backbone.backbone if self.variant == MOBILENET else self.backbone

    # ------------------------------------------------------------------ training (docs/yolov_training.md)
    def freeze_for_training(self, official: bool = True) -> None:
        """The official video fine-tune's frozen parts (:data:`viddet.models.yolov_loss.FROZEN`);
        ``official=False``: every part trained (from scratch)."""
        freeze_still_parts(self, official)

    def init_weights(self) -> '_YOLOVFamily':
        """PyTorch's default initialisation, the score biases at a 0.01 prior (the official
        ``get_model``; the weights of a YOLOX base then overwrite what they hold)."""
        init_score_biases(self.head)
        return self

    def configure_training(self, model_cfg) -> None:
        """Applies the ``model`` section and freezes what the official recipe freezes; with
        ``model.backbone_frozen_stages: 0`` nothing is frozen (training from scratch); on the
        ``mobilenetv2`` body, N in 1..18 freezes its first N ``features`` blocks and trains the rest.

        Raises:
            VidDetError: another ``backbone_frozen_stages``, or a Faster R-CNN option.
        """
        stages = model_cfg.backbone_frozen_stages
        if stages not in (None, 0) and self.variant != MOBILENET:
            raise VidDetError(f'model.backbone_frozen_stages of {self.title} is 0 (train every part) or unset '
                              f'(the official freezing), not {stages}')
        super().configure_training(dataclasses.replace(model_cfg, backbone_frozen_stages=None))
        self.freeze_for_training(official=stages is None)
        if stages and self.variant == MOBILENET:
            self.backbone.backbone.frozen_stages = stages
            self.backbone.backbone.freeze()

    def losses(self, sample, cfg):
        """The official training losses of the frames of ``sample`` (key + references, one batch in
        which every frame attends to all; :func:`viddet.models.yolov_loss.sample_losses`)."""
        return sample_losses(self, sample)

    # ------------------------------------------------------------------ inference
    def prepare(self, image: np.ndarray, scale=None):
        """The official letterbox preprocessing (``scale`` is ignored: the input is 576 x 576)."""
        return letterbox(image, INPUT_SIZE)

    def forward(self, imgs: torch.Tensor) -> HeadOutput:
        """Everything the model computes for a batch of frames (B, 3, 576, 576) that attend to one
        another (:class:`viddet.models.yolov_head.HeadOutput`, boxes in input pixels)."""
        return self.head(self.backbone(imgs))

    def reset(self) -> None:
        """Forgets the offline batches and the online memory."""
        self._batch_of: Dict[int, List[int]] = {}
        self._results: Dict[int, Detections] = {}
        self._memory: Deque[FrameCandidates] = deque(maxlen=self.memory)

    def read_ahead(self, mode: str) -> int:
        """Offline, a frame's batch holds up to ``gframe`` - 1 other frames, read before it returns;
        online nothing is read ahead."""
        return self.gframe - 1 if mode == 'offline' else 0

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
            self._results[f.index] = self._detections(r, f)

    def _detections(self, rows: torch.Tensor, frame) -> Detections:
        """(m, 7) head rows of ``frame`` -> its detections in original-image pixels (clipped with ``clip``)."""
        h, w = frame.meta.ori_shape
        det = Detections(rows[:, :4] / letterbox_ratio((h, w), INPUT_SIZE), rows[:, 4] * rows[:, 5], rows[:, 6].long())
        return clip_detections(det, h, w) if self.clip else det

    def _predict_online(self, frame, ctx) -> Detections:
        with ctx.timer('backbone'):
            feats = self.backbone(frame.img)
        with ctx.timer('head'):
            current = frame_candidates(self.head, feats)
            rows = last_frame_detections(self.head, [*self._memory, current])
        self._memory.append(current)   # the oldest frame leaves a full memory (maxlen)
        return self._detections(rows, frame)

    def predict(self, frame, ctx) -> Detections:
        """The detections of ``frame`` (original-image pixels, all of them, descending score):
        offline from its batch, online from its own candidates and those of the memory.

        Raises:
            VidDetError: offline on a stream of unknown length.
        """
        if ctx.mode == 'online':
            return self._predict_online(frame, ctx)
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
    default_checkpoint = 'yolov_s'
    signature = ('backbone.backbone.', 'head.trans.')
    head_class = YOLOVHead


class YOLOVPP(_YOLOVFamily):
    """YOLOV++: YOLOX + :class:`viddet.models.yolov_head.YOLOVPPHead` (candidates by
    obj · cls >= 0.001, at least 50 for L / X, refined classification and objectness)."""

    name = 'yolovpp'
    title = 'YOLOV++'
    paper = 'Shi et al., Practical Video Object Detection via Feature Selection and Aggregation (YOLOV++), IJCV 2025'
    default_checkpoint = 'yolovpp_s'
    signature = ('backbone.backbone.', 'head.agg.')
    head_class = YOLOVPPHead
    train_backbones = (*VARIANTS, MOBILENET, *TRANSFORMERS)

    @classmethod
    def build(cls, backbone: str = 'yolox_s', num_classes: int = 30, **settings) -> 'YOLOVPP':
        """A new model on a YOLOX variant or on a transformer backbone of
        :data:`viddet.models.yolov_backbones.TRANSFORMERS` (``swin_tiny``, ``swin_base``,
        ``focal_large``: the official Swin / FocalNet exp files; needs timm).

        Raises:
            VidDetError: another backbone name, or timm is not installed.
        """
        if backbone not in TRANSFORMERS:
            return super().build(backbone, num_classes, **settings)
        spec = TRANSFORMERS[backbone]
        head = cls.head_class(num_classes, spec.width, minimal_limit=spec.minimal_limit, in_channels=spec.neck_out)
        return cls(transformer_pafpn(backbone), head, backbone, **settings)

    @classmethod
    def head_options(cls, variant):
        """``minimal_limit``: 0 for S (``v++_base_decoupleReg.py``), 50 for L (``v++_large_decoupleReg.py``)."""
        return {'minimal_limit': 0 if variant == 'yolox_s' else 50}
