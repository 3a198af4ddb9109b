"""The contract every VID method fulfils, whatever its detector family: the facts it declares, its
settings, and the things it computes.

A method is a class derived from :class:`VIDMethod` (the Faster R-CNN methods derive from
:class:`viddet.methods.faster_rcnn.FasterRCNNMethod`, which fills in what they share). Its modules
carry the attribute names of the reference implementation's model, so that published checkpoints
load unchanged. It declares, as class attributes, everything the rest of viddet needs to know — the
CLI, the checkpoint loader, the config checks, the trainer and the benchmark read these facts and
call these methods; none of them compares method names or probes a model's attributes:

==========================  ================================================================
``name``                    short name in configs, the CLI and checkpoints (``dff``)
``title``                   display name (``DFF``)
``paper``                   the paper it implements
``default_checkpoint``      the model-zoo checkpoint ``--checkpoint`` defaults to (None: none)
``signature``               state-dict key prefixes that identify its checkpoints when their
                            ``meta`` does not name the method (MMTracking files); the most
                            specific matching method wins
``Settings``                its inference settings: a dataclass derived from
                            :class:`MethodSettings` (``--set test.KEY=VALUE``, the keyword
                            arguments of ``VideoDetector.from_checkpoint``, ``model.test`` of a
                            training config, ``run.json`` and the CLI help all come from it)
``fast_modules``            ``{plain module class: fast module class}`` of its own modules
                            (:mod:`viddet.speedups` swaps them in for inference)
``has_flownet``             whether it has a FlowNet (``motion``) to initialise / freeze
``train_num_refs``          reference frames each training sample needs (0: none)
``trainable``               whether ``viddet train`` can train it (False: inference only)
``train_backbones``         the ``model.backbone`` names a training config may give
``train_transform``         its own preprocessing of training frames (None: MMTracking's
                            resize + normalisation; YOLOV: the square letterbox)
``per_frame_augment``       True: each training frame flipped and HSV-jittered on its own
                            (YOLOX; the YOLOV family); False: one flip for all frames
==========================  ================================================================

It computes:

* :meth:`VIDMethod.build` (a new model) and :meth:`VIDMethod.build_for_checkpoint` (the model a
  checkpoint's tensors load into, with :meth:`VIDMethod.checkpoint_state` mapping them);
* :meth:`VIDMethod.prepare`: the preprocessing of one decoded frame, which the engine applies to
  every frame (default MMTracking's resize + normalisation + padding; YOLOV: a 576 x 576 letterbox);
* :meth:`VIDMethod.predict`: the detections of one frame of a video, given a context through which
  it may look at other frames (:class:`viddet.engine.video.VideoContext`); :meth:`reset` forgets
  the per-video state;
* :meth:`VIDMethod.losses`: the training losses of one :class:`TrainSample`;
  :meth:`VIDMethod.forward_train` averages them over a batch; :meth:`configure_training` applies
  the ``model`` section of a training config; :meth:`init_weights` initialises the parts trained
  from scratch; :attr:`backbone` and :attr:`class_specific_prefixes` tell the trainer where
  ImageNet weights go and which tensors are re-initialised when fine-tuning on other classes.

Adding a method is one new file in this folder and one entry in ``METHODS`` in
``viddet/methods/__init__.py`` (see ``docs/CONTRIBUTING.md``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import nn

from viddet.data.transforms import preprocess
from viddet.errors import VidDetError
from viddet.models.backbones import BACKBONE_NAMES
from viddet.structures import Detections, ImageMeta, TrainSample


@dataclass
class MethodSettings:
    """Inference settings every method has; a method's ``Settings`` derives from this class and adds
    its own fields (each with a default and ``metadata={'help': ...}``, and range checks in
    ``__post_init__`` raising ValueError).

    Attributes:
        fast: run the fast paths of :mod:`viddet.speedups` (True) or the plain modules (False;
            same detections up to float rounding).
    """
    fast: bool = dataclasses.field(default=True, metadata={'help': 'run the fast paths (false: the '
                                                                   'plain modules, same detections)'})

    def values(self) -> Dict[str, Any]:
        """The settings as a plain dict (``run.json``, checkpoints' ``model.test``)."""
        return dataclasses.asdict(self)

    def build_kwargs(self) -> Dict[str, Any]:
        """The method's own settings (``fast`` aside): the keyword arguments of ``build``."""
        return {k: v for k, v in self.values().items() if k != 'fast'}

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help_lines(cls) -> List[str]:
        """``KEY (default): help`` for each field, for the CLI help."""
        return [f'{f.name} ({f.default}): {f.metadata.get("help", "")}' for f in dataclasses.fields(cls)]


def at_least(settings: MethodSettings, minimum: int, *names: str) -> None:
    """Raises ValueError when a field of ``settings`` named in ``names`` is below ``minimum``."""
    for name in names:
        if getattr(settings, name) < minimum:
            raise ValueError(f'{name} must be >= {minimum}, got {getattr(settings, name)}')


class VIDMethod(nn.Module):
    """Base class of the VID methods (see the module docstring for the contract)."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ''
    default_checkpoint: ClassVar[Optional[str]] = None
    signature: ClassVar[Tuple[str, ...]] = ()
    Settings: ClassVar[Type[MethodSettings]] = MethodSettings
    fast_modules: ClassVar[Mapping[Type[nn.Module], Type[nn.Module]]] = {}
    """``{plain module class: fast module class}`` for modules of this method's own, which
    :func:`viddet.speedups.convert` swaps in for inference (the protocol a fast module class
    follows: :mod:`viddet.models.fast`)."""
    has_flownet: ClassVar[bool] = False
    train_num_refs: ClassVar[int] = 0
    class_specific_prefixes: ClassVar[Tuple[str, ...]] = ()
    """State-dict prefixes of the tensors whose shape depends on the number of classes."""
    trainable: ClassVar[bool] = True
    """Whether ``viddet train`` can train it (False: inference only; the config check refuses it)."""
    train_backbones: ClassVar[Tuple[str, ...]] = BACKBONE_NAMES
    """The ``model.backbone`` names a training config may give (default the Faster R-CNN backbones)."""
    train_transform: ClassVar[Optional[Callable[[np.ndarray, Tuple[int, int]], Tuple[torch.Tensor, ImageMeta]]]] = None
    """The preprocessing of a training frame, ((H, W, 3) uint8 BGR, ``data.scale``) -> (tensor,
    ImageMeta), when it is not MMTracking's resize + normalisation + padding (a plain function:
    datasets in DataLoader workers call it)."""
    per_frame_augment: ClassVar[bool] = False
    """True: every training frame gets its own horizontal flip (probability ``data.flip_ratio``) and
    HSV jitter (``data.hsv_prob``), as YOLOX's ``TrainTransform`` (:mod:`viddet.data.frame_augment`;
    needs a ``train_transform`` giving raw 0..255 pixels); False: one flip decision for all frames
    of a sample (MMTracking's ``SeqRandomFlip(share_params=True)``) and no HSV jitter."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, backbone: str = 'r50', num_classes: int = 30, **settings) -> 'VIDMethod':
        """A new, randomly initialised model of this method.

        Args:
            backbone: a name of :data:`viddet.models.backbones.BACKBONES`.
            num_classes: object classes (30 for ImageNet VID).
            settings: the method's own settings (fields of its ``Settings`` but ``fast``), e.g.
                ``key_frame_interval=5`` for DFF.

        Raises:
            TypeError: a setting the method does not have.
            VidDetError: unknown backbone.
        """
        raise NotImplementedError

    @classmethod
    def build_for_checkpoint(cls, backbone: str, num_classes: int, state: Mapping[str, torch.Tensor],
                             **settings) -> 'VIDMethod':
        """The model that the tensors of a checkpoint (``state``, after :meth:`checkpoint_state`)
        load into; by default :meth:`build`. A method whose shape depends on the file (the single-
        frame detector of any VID checkpoint) reads it off ``state``."""
        return cls.build(backbone, num_classes, **settings)

    @classmethod
    def checkpoint_state(cls, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The tensors of a checkpoint that this method loads, under its own key names (default: all,
        unchanged; a method may drop other methods' modules or rename keys)."""
        return dict(state)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ inference
    def prepare(self, image: np.ndarray, scale: Tuple[int, int]) -> Tuple[torch.Tensor, ImageMeta]:
        """This method's test-time preprocessing of one decoded frame, which the engine applies to
        every frame: (H, W, 3) uint8 BGR -> (tensor (3, Hp, Wp) float32, :class:`ImageMeta`).
        Default: MMTracking's (:func:`viddet.data.transforms.preprocess`: keep-ratio resize within
        ``scale`` (long, short) pixels, normalisation, padding to 16)."""
        return preprocess(image, scale)

    def reset(self) -> None:
        """Forgets all per-video state (called before and after every video)."""

    def predict(self, frame, ctx) -> Detections:
        """Detections of ``frame`` (a :class:`viddet.engine.video.VideoFrame`) in original-image
        pixels; ``ctx`` (:class:`viddet.engine.video.VideoContext`) gives the mode, other frames of
        the video and the stage timer."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    @property
    def backbone(self) -> nn.Module:
        """The module whose stages can be frozen; ImageNet weights load into :attr:`imagenet_body`."""
        raise NotImplementedError

    @property
    def imagenet_body(self) -> nn.Module:
        """The part of :attr:`backbone` that ``init.backbone_weights`` initialise, every tensor of it
        from the file (default the whole backbone; YOLOV's ``mobilenetv2``: the body under the neck)."""
        return self.backbone

    @property
    def train_cfg(self):
        """The training settings in use (default :meth:`train_config`; :meth:`configure_training`
        or the trainer may set them)."""
        cfg = self.__dict__.get('_train_cfg')
        return cfg if cfg is not None else self.train_config()

    @train_cfg.setter
    def train_cfg(self, cfg):
        self.__dict__['_train_cfg'] = cfg

    @classmethod
    def train_config(cls):
        """The method's default training settings (its reference config's ``train_cfg``)."""
        return None

    def configure_training(self, model_cfg) -> None:
        """Applies the ``model`` section of a training config (:class:`viddet.config.ModelConfig`:
        proposal / sample counts, frozen backbone stages, FlowNet mode) to this model.

        Raises:
            VidDetError: a setting this method cannot apply (here: any of the Faster R-CNN options
                ``rpn_train_proposals``, ``rcnn_samples``, ``backbone_frozen_stages`` set, or a
                FlowNet mode other than ``train``; a method that applies them overrides this).
        """
        for key in ('rpn_train_proposals', 'rcnn_samples', 'backbone_frozen_stages'):
            if getattr(model_cfg, key) is not None:
                raise VidDetError(f'model.{key} does not apply to {self.title}')
        if model_cfg.flownet != 'train':
            raise VidDetError(f'model.flownet={model_cfg.flownet} does not apply to {self.title}')

    def read_ahead(self, mode: str) -> int:
        """How many frames after the current one :meth:`predict` reads in ``mode`` (``offline`` /
        ``online``) before it returns: a benchmark gives a video that many extra frames so that each
        timed frame sees a full window (FGFA offline: ``num_right``; 0 by default)."""
        return 0

    def init_weights(self) -> 'VIDMethod':
        """Initialises the parts trained from scratch as the reference implementation does (the
        backbone is left alone: it gets ImageNet weights). Returns self."""
        return self

    def losses(self, sample: TrainSample, cfg) -> Dict[str, torch.Tensor]:
        """Training losses of one sample (the reference implementation's ``forward_train``)."""
        raise NotImplementedError

    def forward_train(self, batch: Union[TrainSample, Sequence[TrainSample]]) -> Dict[str, torch.Tensor]:
        """Training losses of a batch, the mean over its samples of each sample's losses.

        MMTracking trains every VID method with one key image per GPU and lets DDP average the
        gradients; computing each sample's losses on its own and averaging keeps that unit, so a
        batch of B samples, k accumulated batches or W processes give the gradient of W*k*B GPUs.

        Args:
            batch: one :class:`TrainSample` or a list of them (each on the model's device).

        Returns:
            scalar tensors by name (Faster R-CNN methods: {'loss_rpn_cls', 'loss_rpn_bbox',
            'loss_cls', 'loss_bbox', 'acc'}); the total loss is the sum of the terms whose name
            contains ``loss`` (:func:`viddet.models.losses.sum_losses`).

        Raises:
            ValueError: empty batch or a sample without the reference frames the method needs.
        """
        samples = [batch] if isinstance(batch, TrainSample) else list(batch)
        if not samples:
            raise ValueError('forward_train needs at least one sample')
        cfg = self.train_cfg
        total: Dict[str, torch.Tensor] = {}
        for s in samples:
            if self.train_num_refs and (s.ref_imgs.dim() != 4 or s.ref_imgs.shape[0] < 1):
                raise ValueError(f'{self.title} training needs at least 1 reference image per sample, '
                                 f'got ref_imgs of shape {tuple(s.ref_imgs.shape)}')
            for k, v in self.losses(s, cfg).items():
                total[k] = total[k] + v if k in total else v
        return {k: v / len(samples) for k, v in total.items()}
