"""Training configuration: typed dataclasses loaded from YAML, with dotted command-line overrides.

A config file has up to five sections, ``model``, ``data``, ``schedule``, ``init`` and
``eval`` (see ``configs/selsa_r50.yaml`` for a complete, commented example), and may start from
another file (``base:``, see :func:`load_config`). Loading:

1. the YAML is read into plain dicts/lists;
2. each ``--set key.sub=value`` override is applied (the value is parsed as YAML, so ``3``,
   ``0.02``, ``true``, ``null``, ``[2, 5]`` get their types; list items are addressed by index,
   ``data.train.0.ann_file=...``);
3. the result is converted into :class:`Config`, checking every key and type: unknown keys (with a
   "did you mean" hint), wrong types and out-of-range values raise :class:`viddet.VidDetError`
   naming the file and the dotted key;
4. :meth:`Config.check_paths` verifies that the annotation files, image folders and init weights
   exist — the trainer calls it before building anything, so a typo fails in a second instead of
   after the model is built.

Defaults reproduce MMTracking's ImageNet VID recipe (MMTracking 0.14
``configs/vid/selsa/selsa_faster_rcnn_r50_dc5_1x_imagenetvid.py``): SGD lr 0.01 for a total batch
of 8 key images (scaled linearly with the actual total batch), momentum 0.9, weight decay 1e-4,
linear warm-up over 500 iterations from lr/3, x0.1 at the starts of epochs 3 and 6 (mmdet
``step=[2, 5]``), 7 epochs, gradient clipping at L2 norm 35.

Relative paths are relative to the current working directory (run ``viddet train`` from the
repository root, as MMTracking's ``data/ILSVRC/...`` paths assume).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from viddet.classes import VID_CLASSES
from viddet.errors import VidDetError
from viddet.methods import METHOD_NAMES, METHODS, method_class
from viddet.models.backbones import BACKBONE_NAMES

REF_METHODS = ('uniform', 'bilateral_uniform')


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-4`` and ``5E3`` are numbers (YAML 1.1, which
    PyYAML follows, needs a dot and a signed exponent, ``1.0e-4``, and reads ``1e-4`` as a string)."""


_YamlLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$''', re.X),
    list('-+0123456789.'))


def yaml_load(text: str, source: str):
    """Parses YAML text (YAML 1.2 floats, see :class:`_YamlLoader`).

    Raises:
        VidDetError: not valid YAML, naming ``source`` and the line and column of the error.
    """
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise VidDetError(f'{source}: not valid YAML{where}: {problem}') from None


# ----------------------------------------------------------------------------------- inference
@dataclass
class TestConfig:
    """Inference settings of the methods (MMTracking's ``test_cfg`` and test-time reference
    samplers), with MMTracking's values as defaults. ``model.test`` of a training config; on the
    command line ``--set test.KEY=VALUE`` (``viddet demo`` / ``test``); in Python the keyword
    arguments of ``VideoDetector.from_checkpoint``. A method reads only its own fields
    (``VIDMethod.test_settings``); the others are ignored.

    Attributes:
        key_frame_interval: DFF: the backbone runs on every N-th frame (10).
        num_left, num_right: FGFA: frames before / after the current one in its window (15, 15).
        num_refs: SELSA, TRoI: reference frames (14; offline spread over the video, online the
            last ones at a doubling stride).
        ref_cache: SELSA, TRoI: compute each reference frame's proposals and projections once per
            video (True) or for every frame, as MMTracking does (False; same detections, slower).
        fast: run the fast paths of :mod:`viddet.speedups` (True) or the plain modules (False;
            same detections up to float rounding).
    """
    __test__ = False  # not a pytest test class, despite its name

    key_frame_interval: int = 10
    num_left: int = 15
    num_right: int = 15
    num_refs: int = 14
    ref_cache: bool = True
    fast: bool = True

    def check(self, source: str = 'test') -> 'TestConfig':
        """Raises :class:`VidDetError` on out-of-range values (naming ``source``); returns self."""
        for key in ('key_frame_interval', 'num_refs'):
            if getattr(self, key) < 1:
                raise VidDetError(f'{source}.{key} must be >= 1, got {getattr(self, key)}')
        for key in ('num_left', 'num_right'):
            if getattr(self, key) < 0:
                raise VidDetError(f'{source}.{key} must be >= 0, got {getattr(self, key)}')
        return self

    def ignored_by(self, method: str) -> List[str]:
        """Fields set to a non-default value that ``method`` does not read (``fast`` aside)."""
        used = set(method_class(method).test_settings) | {'fast'}
        default = TestConfig()
        return [f.name for f in dataclasses.fields(self)
                if f.name not in used and getattr(self, f.name) != getattr(default, f.name)]


# ----------------------------------------------------------------------------------- sections
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
        test: inference settings of the trained model (:class:`TestConfig`, e.g.
            ``{num_left: 5, num_right: 5}`` for FGFA); saved with every checkpoint, so that
            ``viddet test`` / ``demo`` run it as its training-time evaluation did.
    """
    method: str = 'selsa'
    backbone: str = 'r50'
    classes: List[str] = field(default_factory=lambda: list(VID_CLASSES))
    rpn_train_proposals: Optional[int] = None
    rcnn_samples: Optional[int] = None
    backbone_frozen_stages: Optional[int] = None
    flownet: str = 'train'
    test: TestConfig = field(default_factory=TestConfig)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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
        flip_ratio: probability of the shared horizontal flip.
        min_size: drop training images whose shorter side is below this (pixels; mmdet 32).
        samples_per_gpu: key frames per process per iteration (MMTracking 1).
        workers: DataLoader worker processes per training process.
    """
    train: List[TrainSourceConfig] = field(default_factory=list)
    val: Optional[ValConfig] = None
    scale: Tuple[int, int] = (1000, 600)
    flip_ratio: float = 0.5
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


# ----------------------------------------------------------------------------------- typed conversion
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f'{_type_name(args[0])} or null'
    if origin in (list, List):
        return f'list of {_type_name(typing.get_args(tp)[0])}'
    if origin in (tuple, Tuple):
        return f'list of {len(typing.get_args(tp))} {_type_name(typing.get_args(tp)[0])}s'
    if origin in (dict, Dict):
        return 'mapping'
    if dataclasses.is_dataclass(tp):
        return 'mapping'
    return {int: 'integer', float: 'number', bool: 'true/false', str: 'string'}.get(tp, str(tp))


def _convert(value, tp, key: str, source: str):
    def bad():
        name = _type_name(tp)
        article = 'an' if name[0] in 'aeiou' else 'a'
        return VidDetError(f'{source}: {key} must be {article} {name}, got {value!r} ({type(value).__name__})')
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, source)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad()
        return _from_dict(tp, value, key, source)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad()
        (sub,) = typing.get_args(tp)
        return [_convert(v, sub, f'{key}.{i}', source) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        return tuple(_convert(v, a, f'{key}.{i}', source) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f'unsupported config field type {tp} at {key}')


def _from_dict(cls, d: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get('internal')}
    kwargs = {}
    for k, v in d.items():
        key = f'{prefix}.{k}' if prefix else str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f' (did you mean {prefix + "." if prefix else ""}{close[0]}?)' if close else ''
            raise VidDetError(f'{source}: unknown key {key}{hint}; '
                              f'known keys{" of " + prefix if prefix else ""}: {", ".join(fields)}')
        kwargs[k] = _convert(v, hints[k], key, source)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    src = cfg.source

    def err(msg):
        return VidDetError(f'{src}: {msg}')
    m = cfg.model
    if m.method not in METHOD_NAMES:
        raise err(f'model.method must be one of {", ".join(METHOD_NAMES)}, got {m.method!r}')
    if m.backbone not in BACKBONE_NAMES:
        raise err(f'model.backbone must be one of {", ".join(BACKBONE_NAMES)}, got {m.backbone!r}')
    method = method_class(m.method)
    m.test.check(f'{src}: model.test')
    if not m.classes:
        raise err('model.classes is empty')
    if len(set(m.classes)) != len(m.classes):
        raise err('model.classes has duplicate names')
    for k, v in (('model.rpn_train_proposals', m.rpn_train_proposals), ('model.rcnn_samples', m.rcnn_samples)):
        if v is not None and v < 1:
            raise err(f'{k} must be >= 1, got {v}')
    if m.backbone_frozen_stages is not None and not 0 <= m.backbone_frozen_stages <= (18 if m.backbone == 'mobilenetv2' else 4):
        raise err(f'model.backbone_frozen_stages must be in 0..{18 if m.backbone == "mobilenetv2" else 4} for '
                  f'{m.backbone}, got {m.backbone_frozen_stages}')
    if m.flownet not in ('train', 'frozen', 'zero'):
        raise err(f'model.flownet must be train, frozen or zero, got {m.flownet!r}')
    if m.flownet != 'train' and not method.has_flownet:
        with_flownet = ', '.join(x.name for x in METHODS if x.has_flownet)
        raise err(f'model.flownet={m.flownet} but method {m.method} has no FlowNet (only {with_flownet})')
    needs_refs = 1 if method.train_num_refs else 0
    for i, t in enumerate(cfg.data.train):
        r = t.ref_sampler
        if r is not None:
            if r.method not in REF_METHODS:
                raise err(f'data.train.{i}.ref_sampler.method must be one of {", ".join(REF_METHODS)}, got {r.method!r}')
            if r.num_ref_imgs < 0 or r.frame_range < 0:
                raise err(f'data.train.{i}.ref_sampler: num_ref_imgs and frame_range must be >= 0')
        if needs_refs and (r is None or r.num_ref_imgs < needs_refs):
            raise err(f'data.train.{i}.ref_sampler: method {m.method} needs reference frames '
                      f'(e.g. ref_sampler: {{num_ref_imgs: {method.train_num_refs}, frame_range: 9}})')
    d = cfg.data
    if len(d.scale) != 2 or min(d.scale) < 16:
        raise err(f'data.scale must be [long, short] pixels >= 16, got {list(d.scale)}')
    if not 0.0 <= d.flip_ratio <= 1.0:
        raise err(f'data.flip_ratio must be in [0, 1], got {d.flip_ratio}')
    if d.samples_per_gpu < 1:
        raise err(f'data.samples_per_gpu must be >= 1, got {d.samples_per_gpu}')
    if d.workers < 0:
        raise err(f'data.workers must be >= 0, got {d.workers}')
    if d.val is not None and d.val.mode not in ('offline', 'online'):
        raise err(f'data.val.mode must be offline or online, got {d.val.mode!r}')
    s = cfg.schedule
    if s.epochs < 1:
        raise err(f'schedule.epochs must be >= 1, got {s.epochs}')
    if s.lr <= 0:
        raise err(f'schedule.lr must be > 0, got {s.lr}')
    if s.lr_batch < 0 or s.warmup_iters < 0 or s.log_interval < 1:
        raise err('schedule.lr_batch and schedule.warmup_iters must be >= 0, schedule.log_interval >= 1')
    if not 0 < s.warmup_ratio <= 1:
        raise err(f'schedule.warmup_ratio must be in (0, 1], got {s.warmup_ratio}')
    if sorted(s.steps) != list(s.steps) or any(x < 1 for x in s.steps):
        raise err(f'schedule.steps must be increasing epochs >= 1, got {s.steps}')
    if s.max_nonfinite_steps < 1:
        raise err(f'schedule.max_nonfinite_steps must be >= 1, got {s.max_nonfinite_steps}')
    if s.grad_clip is not None and s.grad_clip <= 0:
        raise err(f'schedule.grad_clip must be > 0 or null, got {s.grad_clip}')
    if cfg.eval.interval < 0:
        raise err(f'eval.interval must be >= 0, got {cfg.eval.interval}')


# ----------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> Tuple[str, Any]:
    """``"schedule.epochs=3"`` -> ``("schedule.epochs", 3)`` (the value is parsed as YAML).

    Raises:
        VidDetError: no ``=`` or an empty key.
    """
    if '=' not in text:
        raise VidDetError(f'--set {text!r}: expected KEY=VALUE, e.g. --set schedule.epochs=3')
    key, raw = text.split('=', 1)
    key = key.strip()
    if not key or any(not p for p in key.split('.')):
        raise VidDetError(f'--set {text!r}: bad key {key!r}')
    try:
        value = yaml.load(raw, Loader=_YamlLoader) if raw.strip() else ''  # noqa: S506
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(raw: dict, key: str, value, source: str = '--set') -> None:
    """Sets ``raw[a][b]... = value`` for the dotted ``key`` (integer parts index lists).

    Missing intermediate mappings are created (the typed conversion then rejects unknown keys).

    Raises:
        VidDetError: a key that goes through a non-mapping, or a list index out of range.
    """
    parts = key.split('.')
    node = raw
    for i, p in enumerate(parts[:-1]):
        where = '.'.join(parts[:i + 1])
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise VidDetError(f'{source} {key}: {where} is not an index of a list of {len(node)} items')
            node = node[int(p)]
        elif isinstance(node, dict):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        else:
            raise VidDetError(f'{source} {key}: {".".join(parts[:i])} is a value, not a section')
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise VidDetError(f'{source} {key}: {last} is not an index of a list of {len(node)} items')
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise VidDetError(f'{source} {key}: cannot set a key inside a value')


# ----------------------------------------------------------------------------------- entry points
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
    cfg = _from_dict(Config, raw, '', source)
    cfg.source = source
    _validate(cfg)
    return cfg


def parse_test_settings(overrides: Sequence[str]) -> Dict[str, Any]:
    """``--set test.KEY=VALUE`` options of ``demo`` / ``test`` -> {KEY: value} (checked against
    :class:`TestConfig`).

    Raises:
        VidDetError: not ``test.KEY=VALUE``, an unknown KEY (with a "did you mean"), a wrong type.
    """
    out: Dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition('.')
        if section != 'test' or not name or '.' in name:
            raise VidDetError(f'--set {text!r}: expected test.KEY=VALUE with KEY one of '
                              f'{", ".join(f.name for f in dataclasses.fields(TestConfig))}')
        out[name] = value
    _from_dict(TestConfig, out, 'test', '--set').check('--set test')
    return out


def load_config(path, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config file and applies ``--set`` overrides (see module docstring).

    A top-level ``base: other.yaml`` (relative to the file) starts from that file's settings:
    mappings are merged key by key, any other value (lists included) is replaced — as MMTracking's
    ``_base_``, e.g. ``configs/selsa_r101.yaml`` is ``selsa_r50.yaml`` with another backbone.

    Raises:
        VidDetError: missing/unparsable file (or base file), a cycle of bases, unknown keys, wrong
            types or values.
    """
    return config_from_dict(_read_with_bases(Path(path), ()), str(path), overrides)


def _read_with_bases(path: Path, seen: Tuple[Path, ...]) -> dict:
    """The raw dict of a config file with its ``base`` chain merged in."""
    if not path.is_file():
        where = f' (the base of {seen[-1]})' if seen else ''
        raise VidDetError(f'config file {path} does not exist{where}')
    if path.resolve() in seen:
        raise VidDetError(f'{path}: "base" chain loops back to itself')
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise VidDetError(f'cannot read config file {path}: {e}') from None
    raw = yaml_load(text, str(path)) or {}
    if not isinstance(raw, dict) or 'base' not in raw:
        return raw
    base = raw.pop('base')
    if not isinstance(base, str):
        raise VidDetError(f'{path}: base must be a config file name, got {base!r}')
    return _merged(_read_with_bases(path.parent / base, seen + (path.resolve(),)), raw)


def _merged(base: dict, top: dict) -> dict:
    """``top`` over ``base``: nested mappings merged key by key, other values replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: Config, path) -> Path:
    """Writes ``cfg`` as YAML (atomically)."""
    from viddet.fileio import atomic_write_text
    return atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
