"""The training configuration: its sections as typed dataclasses (defaults: MMTracking's ImageNet
VID recipe, see :mod:`viddet.config`) and the entry points that read a config file or dict."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from viddet.classes import VID_CLASSES
from viddet.config.files import apply_override, parse_override, read_with_bases
from viddet.config.typed import from_dict, method_settings
from viddet.config.validate import validate
from viddet.errors import VidDetError
from viddet.methods import method_class


@dataclass
class ModelConfig:
    """What to train.

    Attributes:
        method: single | dff | fgfa | selsa | troi.
        backbone: r50 | r101 | x101 (DC5) | mobilenetv2 (lite).
        classes: class names (label i = classes[i]); default the 30 ImageNet VID classes.
            Annotation categories are matched by name.
        rpn_train_proposals: training proposals per key frame (None: 600, DFF 1000).
        rcnn_samples: RoIs sampled per key frame (None: 256, DFF 512).
        backbone_frozen_stages: override the backbone's frozen stages (None: ResNet stem + layer1
            = 1, MobileNetV2-lite features.0-3 = 4). ResNet: 0..4 layers; MobileNetV2-lite: 0..18
            leading ``features`` blocks (e.g. 14 trains only the dilated stride-16 stage).
        flownet: DFF/FGFA only. ``train`` (MMTracking: FlowNet is trained with the rest),
            ``frozen`` (keep its initial weights, e.g. flownet_simple.pth) or ``zero`` (the last
            flow layer is zeroed and FlowNet frozen: the flow is 0 everywhere, i.e. features are
            propagated/aggregated without motion compensation — the sensible choice when no
            pretrained FlowNet is available and the data set is too small to learn flow).
        test: inference settings of the trained model, the fields of its method's ``Settings``
            that differ from their defaults (e.g. ``{num_left: 5, num_right: 5}`` for FGFA; see
            ``viddet test --help``); saved with every checkpoint, so that ``viddet test`` / ``demo``
            run it as its training-time evaluation did.
    """
    method: str = 'selsa'
    backbone: str = 'r50'
    classes: List[str] = field(default_factory=lambda: list(VID_CLASSES))
    rpn_train_proposals: Optional[int] = None
    rcnn_samples: Optional[int] = None
    backbone_frozen_stages: Optional[int] = None
    flownet: str = 'train'
    test: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def settings(self, source: str = '<config>'):
        """The method's inference settings (its ``Settings``) with ``test`` over the defaults.

        Raises:
            VidDetError: a setting the method does not have, a wrong type or value.
        """
        return method_settings(method_class(self.method), self.test, source, 'model.test')


@dataclass
class RefSamplerConfig:
    """Reference frames per key frame (MMTracking ``ref_img_sampler`` of the DFF / FGFA / SELSA configs).

    Attributes:
        num_ref_imgs: references per key frame (DFF 1, FGFA/SELSA 2; 0 = key frame only).
        frame_range: window half-width in frames (9); 0 = copies of the key (DET images).
        filter_key_img: never pick the key frame itself.
        method: uniform | bilateral_uniform.
    """
    num_ref_imgs: int = 2
    frame_range: int = 9
    filter_key_img: bool = True
    method: str = 'bilateral_uniform'


@dataclass
class TrainSourceConfig:
    """One training data set (a COCO-VID JSON and the folder its ``file_name`` paths start in).

    Attributes:
        ann_file: e.g. ``data/ILSVRC/annotations/imagenet_vid_train.json``.
        img_prefix: e.g. ``data/ILSVRC/Data/VID``.
        load_as_video: False for ImageNet DET (still images; references are copies of the key).
        ref_sampler: reference sampling, or None for key frames only.
    """
    ann_file: str = ''
    img_prefix: str = ''
    load_as_video: bool = True
    ref_sampler: Optional[RefSamplerConfig] = None


@dataclass
class ValConfig:
    """Validation set used by the end-of-training / ``--val-interval`` evaluation.

    Attributes:
        ann_file, img_prefix: COCO-VID JSON of the val split and its image folder.
        motion_iou: ``imagenet_vid_groundtruth_motion_iou.mat`` for the official slow/medium/fast
            split (None: computed from the ground truth).
        mode: offline (MMTracking's protocol) | online.
        max_videos: evaluate only the first N videos (None: all).
    """
    ann_file: str = ''
    img_prefix: str = ''
    motion_iou: Optional[str] = None
    mode: str = 'offline'
    max_videos: Optional[int] = None


@dataclass
class DataConfig:
    """Data loading.

    Attributes:
        train: training sets, concatenated (MMTracking: VID train + DET).
        val: validation set, or None (no evaluation).
        scale: keep-ratio resize limits (long, short), pixels (1000, 600).
        flip_ratio: probability of the horizontal flip: one decision for all frames of a sample
            (the Faster R-CNN methods, MMTracking), or each frame's own (the YOLOV family, YOLOX).
        hsv_prob: probability of a frame's HSV jitter (YOLOX's; the YOLOV family only, whose configs
            set 1.0 as officially; 0: none).
        min_size: drop training images whose shorter side is below this (pixels; mmdet 32).
        samples_per_gpu: key frames per process per iteration (MMTracking 1).
        workers: DataLoader worker processes per training process.
    """
    train: List[TrainSourceConfig] = field(default_factory=list)
    val: Optional[ValConfig] = None
    scale: Tuple[int, int] = (1000, 600)
    flip_ratio: float = 0.5
    hsv_prob: float = 0.0
    min_size: int = 32
    samples_per_gpu: int = 1
    workers: int = 2


@dataclass
class ScheduleConfig:
    """Optimisation (MMTracking's ``optimizer``, ``lr_config`` and ``total_epochs``).

    Attributes:
        epochs: training epochs (7).
        lr: learning rate for a total batch of ``lr_batch`` key frames (0.01 for 8); the trainer uses
            lr * total_batch / lr_batch, total_batch = processes x samples_per_gpu x accumulate.
        lr_batch: the batch ``lr`` is quoted for (8); 0 disables the linear scaling.
        momentum, weight_decay: SGD (0.9, 1e-4).
        warmup_iters, warmup_ratio: linear warm-up from lr * ratio to lr over this many optimizer
            steps (500, 1/3); 0 disables it.
        steps: epochs after which lr is multiplied by ``gamma`` ([2, 5]: lr/10 from epoch 3 on,
            lr/100 from epoch 6 on, counting from 1).
        gamma: decay factor (0.1).
        grad_clip: max L2 norm of all gradients (35); null disables clipping.
        seed: seeds model init, data order, reference sampling, flips and RoI sampling.
        log_interval: optimizer steps between TensorBoard/log lines.
        max_nonfinite_steps: a step whose loss (or, without a loss scaler, gradient norm) is not
            finite is skipped (no update); training stops when this many steps in a row are (10).
            Under ``--amp fp16`` a step the GradScaler skips for inf/NaN gradients is normal and
            does not count.
        policy: ``step`` (the above: linear warm-up, step decay; MMTracking) or ``yolox_cos``
            (YOLOX's ``yoloxwarmcos``: quadratic warm-up from 0 over ``warmup_iters``, cosine down to
            ``min_lr_ratio`` x lr, the last ``final_epochs`` epochs at that minimum; ``steps``,
            ``gamma`` and ``warmup_ratio`` unused).
        min_lr_ratio, final_epochs: ``yolox_cos`` only (0.05, 0; a fraction of an epoch is fine).
        nesterov: Nesterov momentum (False; YOLOX / YOLOV: True).
        decay_norm_and_bias: weight decay on normalisation weights and biases too (True); False:
            only on conv / linear weights (tensors of 2+ dimensions; YOLOX / YOLOV).
        ema_decay, ema_ramp: an exponential moving average of the weights (every floating-point
            tensor of the state dict, BatchNorm statistics included), updated after each optimizer
            step with decay ``ema_decay * (1 - exp(-updates / ema_ramp))`` (``ema_ramp`` 0: constant
            ``ema_decay``); evaluation and the checkpoints' ``state_dict`` use it (YOLOX's
            ``ModelEMA``: 0.9998, 2000; :mod:`viddet.engine.ema`). None (the default): no EMA.
    """
    epochs: int = 7
    lr: float = 0.01
    lr_batch: int = 8
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3
    steps: List[int] = field(default_factory=lambda: [2, 5])
    gamma: float = 0.1
    grad_clip: Optional[float] = 35.0
    seed: int = 0
    log_interval: int = 10
    max_nonfinite_steps: int = 10
    policy: str = 'step'
    min_lr_ratio: float = 0.05
    final_epochs: float = 0.0
    nesterov: bool = False
    decay_norm_and_bias: bool = True
    ema_decay: Optional[float] = None
    ema_ramp: float = 2000.0


RANDOM_INIT = 'random'
"""The ``init.*_weights`` value that asks for randomly initialised weights (never the default)."""


@dataclass
class InitConfig:
    """Initial weights. Each ``*_weights`` value is a file, a URL, a name of
    ``viddet.checkpoints.INIT_WEIGHTS`` (downloaded once into the cache), or ``random``.

    Attributes:
        backbone_weights: ImageNet weights of the backbone: ``torchvision://resnet50``,
            ``torchvision://resnet101``, ``open-mmlab://resnext101_64x4d`` (MMTracking's names), a
            torchvision-style ``.pth`` or the MobileNetV2 features file. None: the backbone's own
            (``imagenet_weights`` of ``viddet.models.backbones.BACKBONES``); a backbone without one
            must say ``random`` explicitly.
        flownet_weights: DFF/FGFA: ``flownet_simple`` (MMTracking's
            ``pretrained_weights/flownet_simple.pth``, the default) or a file; ``random`` trains
            FlowNet from random weights (explicitly only; ``model.flownet: zero`` needs none).
        checkpoint: a full viddet/MMTracking checkpoint to start from (fine-tuning: path, URL or
            model-zoo name such as ``selsa_r50``), loaded over the two above; its classifier and box
            regressor are re-initialised when its classes differ from ``model.classes``. With a
            checkpoint, the two above are loaded only when set.
    """
    backbone_weights: Optional[str] = None
    flownet_weights: Optional[str] = None
    checkpoint: Optional[str] = None


@dataclass
class EvalConfig:
    """When to evaluate: every ``interval`` epochs (0 = only at the end) and at the end of training."""
    interval: int = 0
    at_end: bool = True


@dataclass
class Config:
    """A complete training configuration. ``source`` is the file it came from (for messages)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = field(default='<config>', metadata={'internal': True})

    def to_dict(self) -> dict:
        """Plain dict (YAML/JSON-serialisable) without ``source``; saved in checkpoint meta."""
        d = dataclasses.asdict(self)
        d.pop('source', None)
        d['data']['scale'] = list(d['data']['scale'])
        return d

    def check_paths(self, need_val: bool = True) -> None:
        """Raises :class:`VidDetError` if a data file/folder or an init weights file is missing.

        Checked: every ``data.train[i].ann_file`` (file) and ``img_prefix`` (folder); the same for
        ``data.val`` when ``need_val``; ``init.*`` files; ``data.val.motion_iou``.
        """
        problems = []

        def need(path: Optional[str], key: str, kind: str, hint: str = ''):
            if path is None:
                return
            p = Path(path).expanduser()
            ok = p.is_file() if kind == 'file' else p.is_dir()
            if not ok:
                what = 'file' if kind == 'file' else 'folder'
                if p.exists():   # the other kind: say so, not "does not exist"
                    problems.append(f'{key}: {path} is a {"folder" if p.is_dir() else "file"}, not a {what}')
                else:
                    problems.append(f'{key}: {what} {path} does not exist{hint}')

        conv = ' (create it with `viddet convert imagenet-vid --root <ILSVRC> --out <folder>`)'
        if not self.data.train:
            problems.append('data.train: no training data set given')
        for i, t in enumerate(self.data.train):
            need(t.ann_file, f'data.train.{i}.ann_file', 'file', conv if t.ann_file.endswith('.json') else '')
            need(t.img_prefix, f'data.train.{i}.img_prefix', 'dir')
        if need_val and self.data.val is not None:
            need(self.data.val.ann_file, 'data.val.ann_file', 'file', conv)
            need(self.data.val.img_prefix, 'data.val.img_prefix', 'dir')
            need(self.data.val.motion_iou, 'data.val.motion_iou', 'file')
        for key in ('backbone_weights', 'flownet_weights', 'checkpoint'):
            spec = getattr(self.init, key)
            if spec and _names_a_file(spec):   # else a URL or a name, resolved when loading
                need(spec, f'init.{key}', 'file')
        if problems:
            raise VidDetError(f'{self.source}: ' + ('\n  '.join(['missing data:'] + problems)
                                                    if len(problems) > 1 else problems[0]))


def _names_a_file(spec: str) -> bool:
    """Whether an ``init.*`` value is a file path (not a URL, a zoo name or ``random``)."""
    return '://' not in spec and (Path(spec).suffix != '' or '/' in spec or '\\' in spec)


def config_from_dict(raw: dict, source: str = '<config>', overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from a plain dict plus ``KEY=VALUE`` overrides.

    Raises:
        VidDetError: unknown keys, wrong types or values, naming ``source`` and the dotted key.
    """
    raw = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise VidDetError(f'{source}: the top level must be a mapping with model/data/schedule/init/eval sections')
    for o in overrides:
        k, v = parse_override(o)
        apply_override(raw, k, v)
    cfg = from_dict(Config, raw, '', source)
    cfg.source = source
    validate(cfg)
    return cfg


def load_config(path, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config file and applies ``--set`` overrides (see module docstring).

    A top-level ``base: other.yaml`` (relative to the file) starts from that file's settings:
    mappings are merged key by key, any other value (lists included) is replaced — as MMTracking's
    ``_base_``, e.g. ``configs/selsa_r101.yaml`` is ``selsa_r50.yaml`` with another backbone.

    Raises:
        VidDetError: missing/unparsable file (or base file), a cycle of bases, unknown keys, wrong
            types or values.
    """
    return config_from_dict(read_with_bases(Path(path), ()), str(path), overrides)

