"""From a checkpoint to a model ready to run: MMTracking 0.x/1.x files, plain mmdet Faster R-CNN
files, viddet's own files, and the MMTracking model zoo (names -> URL -> verified download into a
local cache).

MMTracking saves ``{"state_dict": ..., "meta": {"CLASSES": ...}}`` (mmcv ``save_checkpoint``); keys
are ``detector.*`` (+ ``motion.*`` for DFF/FGFA, ``aggregator.*`` for FGFA). viddet modules use the
same attribute names, so a file loads with ``strict=True`` and no renaming. :func:`load_model` is the
one way every command and the Python API turn a checkpoint into a model; :func:`load_partial` the one
way weights are loaded into part of a model (ImageNet backbones, fine-tuning).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from viddet import speedups
from viddet.classes import VID_CLASSES
from viddet.config import TestConfig, _convert
from viddet.data.transforms import DEFAULT_SCALE
from viddet.errors import VidDetError
from viddet.methods import METHODS, VIDMethod, method_class, method_of_keys
from viddet.models.backbones import backbone_info, backbone_of_state_dict

ZOO_BASE = 'https://download.openmmlab.com/mmtracking/'

# name -> path under ZOO_BASE (MMTracking 0.14's configs/vid/*/README.md model-zoo tables).
MODEL_ZOO: Dict[str, str] = {}
for _name, _dir, _stamp in [
    ('dff_r50', 'dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid', '20201227_213250-548911a4'),
    ('dff_r101', 'dff/dff_faster_rcnn_r101_dc5_1x_imagenetvid', '20201218_172720-ad732e17'),
    ('dff_x101', 'dff/dff_faster_rcnn_x101_dc5_1x_imagenetvid', '20210819_095932-0a9e6cb5'),
    ('fgfa_r50', 'fgfa/fgfa_faster_rcnn_r50_dc5_1x_imagenetvid', '20201228_022657-f42016f3'),
    ('fgfa_r101', 'fgfa/fgfa_faster_rcnn_r101_dc5_1x_imagenetvid', '20201219_011831-9c9d8183'),
    ('fgfa_x101', 'fgfa/fgfa_faster_rcnn_x101_dc5_1x_imagenetvid', '20210818_223334-8723c594'),
    ('selsa_r50', 'selsa/selsa_faster_rcnn_r50_dc5_1x_imagenetvid', '20201227_204835-2f5a4952'),
    ('selsa_r101', 'selsa/selsa_faster_rcnn_r101_dc5_1x_imagenetvid', '20201218_172724-aa961bcc'),
    ('selsa_x101', 'selsa/selsa_faster_rcnn_x101_dc5_1x_imagenetvid', '20210825_205641-10252965'),
    ('troi_r50', 'temporal_roi_align/selsa_troialign_faster_rcnn_r50_dc5_7e_imagenetvid', '20210820_162714-939fd657'),
    ('troi_r101', 'temporal_roi_align/selsa_troialign_faster_rcnn_r101_dc5_7e_imagenetvid', '20210822_111621-22cb96b9'),
    ('troi_x101', 'temporal_roi_align/selsa_troialign_faster_rcnn_x101_dc5_7e_imagenetvid', '20210822_164036-4471ac42'),
]:
    MODEL_ZOO[_name] = f'vid/{_dir}/{_dir.split("/")[-1]}_{_stamp}.pth'
MODEL_ZOO['selsa_r50_fp16'] = 'fp16/selsa_faster_rcnn_r50_dc5_fp16_1x_imagenetvid_20210728_193846-dce6eb09.pth'

# Initial weights of training, by the names MMTracking 0.14's configs give them: the backbones'
# ``init_cfg=dict(type='Pretrained', checkpoint=...)`` (torchvision's ImageNet ResNets as mmcv
# resolves ``torchvision://``; ``open-mmlab://`` from mmcv/model_zoo/open_mmlab.json) and DFF/FGFA's
# ``motion.init_cfg`` (configs/vid/dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid.py).
INIT_WEIGHTS: Dict[str, str] = {
    'torchvision://resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'torchvision://resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
    'open-mmlab://resnext101_64x4d':
        'https://download.openmmlab.com/pretrain/third_party/resnext101_64x4d-ee2c6f71.pth',
    'flownet_simple': ZOO_BASE + 'pretrained_weights/flownet_simple.pth',
}



def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$VIDDET_HOME/checkpoints`` (default ``~/.cache/viddet``)."""
    return Path(os.environ.get('VIDDET_HOME', Path.home() / '.cache' / 'viddet')) / 'checkpoints'


def zoo_url(name: str) -> str:
    """Published URL of a model-zoo name (``$VIDDET_ZOO_BASE`` overrides the server, for mirrors)."""
    return os.environ.get('VIDDET_ZOO_BASE', ZOO_BASE).rstrip('/') + '/' + MODEL_ZOO[name]


def init_weights_url(name: str) -> str:
    """Published URL of an :data:`INIT_WEIGHTS` name; ``$VIDDET_WEIGHTS_BASE`` (a mirror holding the
    files side by side) replaces everything before the file name."""
    url = INIT_WEIGHTS[name]
    base = os.environ.get('VIDDET_WEIGHTS_BASE')
    return base.rstrip('/') + '/' + url.split('/')[-1] if base else url


def resolve_init_weights(spec: str, key: str, progress: bool = True) -> Path:
    """An initial-weights setting (``init.backbone_weights`` / ``init.flownet_weights``) -> a local
    file: a path, a URL, or an :data:`INIT_WEIGHTS` name such as ``torchvision://resnet50``. URLs and
    names are downloaded once into :func:`cache_dir` (under the published file name, whose
    ``-<hex>`` suffix is checked against the file's SHA-256 as for the VID checkpoints).

    Raises:
        VidDetError: naming ``key``: a missing file, an unknown name, or a failed download (with the
            URL and the cache path to put a manually downloaded file at).
    """
    instead = f'set {key} to the downloaded file'
    if spec in INIT_WEIGHTS:
        dest = cache_dir() / INIT_WEIGHTS[spec].split('/')[-1]
        return dest if dest.is_file() else download(init_weights_url(spec), dest, progress, instead)
    if spec.startswith(('http://', 'https://')):
        dest = cache_dir() / spec.rstrip('/').split('/')[-1]
        return dest if dest.is_file() else download(spec, dest, progress, instead)
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.suffix or os.sep in spec:
        raise VidDetError(f'{key}: file {spec} does not exist')
    raise VidDetError(f'{key}: {spec!r} is neither a file, a URL nor a known name of initial weights '
                      f'({", ".join(INIT_WEIGHTS)}, or random)')


def _hash_prefix(filename: str) -> Optional[str]:
    m = re.search(r'-([0-9a-f]{8,64})\.pth$', filename)
    return m.group(1) if m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, progress: bool = True,
             instead: str = 'pass --checkpoint /path/to/file.pth') -> Path:
    """Downloads ``url`` to ``dest`` atomically, with a progress bar, verifying the hash prefix.

    The file name's ``-<hex>.pth`` suffix (MMTracking's publish convention) must be a prefix of
    the file's SHA-256. ``instead`` completes the advice of a failed download ("..., or <instead>").

    Raises:
        VidDetError: network failure, including a connection that ends before the announced
            Content-Length (saying where to put a manually downloaded file), or hash mismatch.
    """
    from tqdm import tqdm
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + '.', suffix='.part', dir=dest.parent)
    try:
        with os.fdopen(fd, 'wb') as out:
            try:
                resp = urllib.request.urlopen(url, timeout=30)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise VidDetError(
                    f'could not download {url} ({getattr(e, "reason", e)}). Without network access, download '
                    f'it elsewhere and put it at {dest}, or {instead}') from None
            total = int(resp.headers.get('Content-Length') or 0) or None
            received = 0
            try:
                with resp, tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                                desc=f'downloading {dest.name}', disable=not progress) as bar:
                    for chunk in iter(lambda: resp.read(1 << 20), b''):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # connection reset, timeout, disk full
                raise VidDetError(f'downloading {url} failed after {received} bytes ({type(e).__name__}: {e}). '
                                  f'Try again, or download it elsewhere and put it at {dest}') from None
            # http.client returns b'' (no error) when the server closes the connection early
            if total is not None and received != total:
                raise VidDetError(f'downloading {url} stopped after {received} of {total} bytes. '
                                  f'Try again, or download it elsewhere and put it at {dest}')
        prefix = _hash_prefix(dest.name)
        if prefix is not None:
            digest = _sha256(Path(tmp))
            if not digest.startswith(prefix):
                raise VidDetError(f'downloaded {url} but its SHA-256 {digest[:12]}… does not start with '
                                  f'{prefix} as its name says: the file is corrupt or not the published one')
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def resolve_checkpoint(spec: str, progress: bool = True) -> Path:
    """A local path, a URL or a model-zoo name (e.g. ``selsa_r50``) -> a local file path.

    URLs and zoo names are downloaded once into :func:`cache_dir`.

    Raises:
        VidDetError: unknown name / missing file / failed download, with what to do about it.
    """
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise VidDetError(f'checkpoint {spec} is a folder, not a checkpoint file (give the .pth file in it)')
    if spec.startswith(('http://', 'https://')):
        dest = cache_dir() / spec.rstrip('/').split('/')[-1]
        return dest if dest.is_file() else download(spec, dest, progress)
    if spec in MODEL_ZOO:
        dest = cache_dir() / MODEL_ZOO[spec].split('/')[-1]
        return dest if dest.is_file() else download(zoo_url(spec), dest, progress)
    if p.suffix or os.sep in spec:
        raise VidDetError(f'checkpoint file {spec} does not exist')
    raise VidDetError(f'{spec!r} is neither a checkpoint file, a URL nor a model-zoo name '
                      f'(known: {", ".join(MODEL_ZOO)})')


def _numpy_safe_globals() -> list:
    """numpy scalar/array reconstructors, allowed in ``weights_only`` loading: mmcv/MMTracking
    training metadata (e.g. ``hook_msgs``, seeds) may hold numpy scalars; they are plain data."""
    import numpy as np
    allowed = [np.dtype, np.ndarray]
    for mod, name in (('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
                      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct')):
        try:
            allowed.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    allowed += [type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32', 'bool')]
    return allowed


def read_checkpoint_dict(path) -> dict:
    """The whole dict of a checkpoint file (weights, and for a training checkpoint the optimizer,
    RNG and position), read with ``torch.load(weights_only=True)``: a file holding other Python
    objects is refused, never executed.

    Raises:
        VidDetError: naming the file: not a readable torch file (truncated, a full pickle, another
            format) or not a dict.
    """
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error means "not a checkpoint"
        raise VidDetError(f'{path} is not a readable PyTorch checkpoint: {_load_error(e)}'
                          + _cache_advice(path)) from None
    if not isinstance(obj, dict):
        raise VidDetError(f'{path} holds a {type(obj).__name__}, not a checkpoint dict')
    return obj


def read_checkpoint(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Reads a checkpoint file with ``torch.load(weights_only=True)``.

    Returns:
        (state_dict, meta): the ``state_dict`` entry when present (MMTracking/mmdet/viddet), else
        the bare dict; ``meta`` is the file's ``meta`` dict or {}.

    Raises:
        VidDetError: not a readable torch file, or no tensors in it.
    """
    obj = read_checkpoint_dict(path)
    state = obj.get('state_dict', obj.get('model', obj))
    meta = obj.get('meta') or {}
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise VidDetError(f'{path} contains no model weights (keys: {list(obj)[:8]})')
    return state, meta if isinstance(meta, dict) else {}


def _load_error(e: Exception) -> str:
    """The reason a ``torch.load`` failed, in one sentence (torch's messages run to many lines)."""
    text = str(e).strip()
    if 'Weights only load failed' in text or 'Unsupported global' in text or 'GLOBAL' in text:
        return ('it contains Python objects other than tensors and plain data, which viddet does not '
                'execute (a full pickle, or a file that is not a model checkpoint)')
    if 'zip' in text.lower() or 'magic number' in text or 'EOF' in text or 'truncated' in text:
        return 'the file is truncated or not a PyTorch checkpoint (its archive cannot be read)'
    first = text.splitlines()[0] if text else type(e).__name__
    return first if len(first) <= 300 else first[:300].rsplit(' ', 1)[0] + ' …'


def _cache_advice(path) -> str:
    try:
        in_cache = Path(path).resolve().is_relative_to(cache_dir().resolve())
    except (OSError, ValueError):
        in_cache = False
    return (f'. It is in the download cache: delete it ({path}) and run again to download it anew'
            if in_cache else '')


def class_names(meta: dict) -> Tuple[str, ...]:
    """Class names from a checkpoint's meta (MMTracking 0.x ``CLASSES``, 1.x ``dataset_meta.classes``
    or ``classes``), else the 30 ImageNet VID classes."""
    for getter in (lambda m: m['CLASSES'], lambda m: m['dataset_meta']['classes'], lambda m: m['classes']):
        try:
            names = getter(meta)
        except (KeyError, TypeError):
            continue
        if names:
            return tuple(names)
    return VID_CLASSES


def describe_state_dict(state: Dict[str, torch.Tensor]) -> Tuple[Optional[str], Optional[str]]:
    """(method, backbone) of a state dict from its keys, e.g. ('selsa', 'r101'), (None, None) when
    it holds no detector. The method is the most specific one whose ``signature`` key prefixes
    occur (:func:`viddet.methods.method_of_keys`); the backbone is read off the backbone keys
    (:func:`viddet.models.backbones.backbone_of_state_dict`). Keys of a plain mmdet Faster R-CNN
    (``backbone.*``, ...) count with a ``detector.`` prefix."""
    state = _with_detector_prefix(state)
    cls = method_of_keys(state)
    if cls is None:
        return None, None
    return cls.name, backbone_of_state_dict(state)


def describe(method: Optional[str], backbone: Optional[str]) -> str:
    """'a SELSA R-101 checkpoint' style description."""
    if method is None:
        return 'not a Faster R-CNN / MMTracking VID checkpoint'
    title = backbone_info(backbone).title if backbone else '(unknown backbone)'
    return f'a {method_class(method).title} {title} checkpoint'


def _with_detector_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A plain mmdet Faster R-CNN state dict (``backbone.*``, ``rpn_head.*``...) gets the
    ``detector.`` prefix that MMTracking's VID models use."""
    if any(k.startswith('detector.') for k in state):
        return state
    return {f'detector.{k}': v for k, v in state.items()}


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str,
              ignore_prefixes: Tuple[str, ...] = ()) -> None:
    """Strictly loads ``state`` into ``model`` (names and shapes), after dropping ``ignore_prefixes``.

    Raises:
        VidDetError: listing the first missing / unexpected / mis-shaped keys and what the file
            looks like (e.g. "this is a SELSA R-101 checkpoint"), naming ``source``.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f'{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})'
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        kind = describe(*describe_state_dict(state))
        parts = [f'{source} does not fit this model; it looks like {kind}.']
        for label, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shape)):
            if items:
                more = f' … (+{len(items) - 5} more)' if len(items) > 5 else ''
                parts.append(f'{len(items)} {label}: {", ".join(items[:5])}{more}')
        raise VidDetError('\n  '.join(parts))
    model.load_state_dict(state, strict=True)


def load_partial(module: nn.Module, state: Dict[str, torch.Tensor], source: str,
                 rename: Callable[[str], Optional[str]] = lambda k: k) -> Tuple[List[str], List[str]]:
    """Loads the tensors of ``state`` that fit ``module`` (names after ``rename``; None drops a key),
    like mmcv's ``load_checkpoint(strict=False)``: ImageNet backbone weights, fine-tuning.

    Returns:
        (missing, unused): the module's keys the file did not give, and the file's keys that were
        not used (renamed away or unknown to the module).

    Raises:
        VidDetError: a tensor whose shape differs from the module's (naming ``source``, the key and
            both shapes), or no tensor of the module at all.
    """
    own = module.state_dict()
    mapped, unused = {}, []
    for k, v in state.items():
        key = rename(k)
        if key is None or key not in own:
            unused.append(k)
            continue
        if tuple(v.shape) != tuple(own[key].shape):
            raise VidDetError(f'{source}: {k} has shape {tuple(v.shape)} but the {type(module).__name__} '
                              f'expects {tuple(own[key].shape)} at {key}: weights of another model or size?')
        mapped[key] = v
    if not mapped:
        raise VidDetError(f'{source} contains no weight of this {type(module).__name__} '
                          f'(first keys: {", ".join(list(state)[:5])})')
    module.load_state_dict(mapped, strict=False)
    return [k for k in own if k not in mapped], unused


def check_finite(state: Dict[str, torch.Tensor], source: str) -> None:
    """Raises :class:`VidDetError` naming the tensors of ``state`` that hold NaN or infinity (a
    diverged training run: such a model detects nothing)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''
        raise VidDetError(f'{source} has NaN or infinite weights in {len(bad)} tensor(s): '
                          f'{", ".join(bad[:3])}{more}; it comes from a diverged training run and '
                          f'would detect nothing')


# ===================================================================================== checkpoint -> model
@dataclass
class LoadedModel:
    """What :func:`load_model` returns.

    Attributes:
        model: the method module with the checkpoint's weights, in eval mode, on the CPU.
        class_names: label i -> class_names[i] (the checkpoint's classes, else ImageNet VID's 30).
        meta: the checkpoint's ``meta`` dict.
        path: the local checkpoint file (None for random weights).
        scale: the resize limits (long, short) the model was trained for, pixels.
        test: the inference settings in force (:class:`viddet.config.TestConfig`).
    """
    model: VIDMethod
    class_names: Tuple[str, ...]
    meta: dict
    path: Optional[Path]
    scale: Tuple[int, int]
    test: TestConfig


def checkpoint_test_settings(meta: dict) -> TestConfig:
    """The inference settings a viddet checkpoint was trained and evaluated with (``model.test`` of
    the training config in ``meta['config']``, e.g. FGFA's ±5 window), so that ``viddet test`` and
    ``demo`` score it as its training run did; MMTracking's defaults for MMTracking checkpoints
    (whose ``meta['config']`` is mmcv config text).

    Raises:
        VidDetError: a ``model.test`` entry viddet does not know (another viddet version?).
    """
    cfg = meta.get('config') if isinstance(meta, dict) else None
    model = cfg.get('model') if isinstance(cfg, dict) else None
    test = model.get('test') if isinstance(model, dict) else None
    if not isinstance(test, dict):
        return TestConfig()
    return _convert(test, TestConfig, 'model.test', 'checkpoint meta').check('checkpoint meta model.test')


def inference_scale(meta: dict) -> Tuple[int, int]:
    """Resize limits a checkpoint was trained for: ``data.scale`` of a viddet training config in
    ``meta['config']``, else MMTracking's (1000, 600)."""
    cfg = meta.get('config') if isinstance(meta, dict) else None
    scale = cfg.get('data', {}).get('scale') if isinstance(cfg, dict) else None
    if isinstance(scale, (list, tuple)) and len(scale) == 2:
        return int(scale[0]), int(scale[1])
    return DEFAULT_SCALE


def load_model(checkpoint: Optional[str] = None, method: Optional[str] = None, backbone: Optional[str] = None,
               test: Optional[TestConfig] = None, random_weights: bool = False, progress: bool = True,
               **settings) -> LoadedModel:
    """The one way from a checkpoint to a ready model (CLI, Python API, benchmark, training's
    evaluation and initialisation).

    Args:
        checkpoint: local path, URL or model-zoo name (``dff_r50``, ``selsa_x101``...). Default:
            the zoo checkpoint of ``method`` (``default_checkpoint`` of its class; SELSA's).
        method: ``single|dff|fgfa|selsa|troi``; default: what the checkpoint is. ``single``
            accepts the detector part of any VID checkpoint (with its number of shared fcs).
        backbone: default: what the checkpoint is.
        test: inference settings; default the checkpoint's own (:func:`checkpoint_test_settings`),
            with ``settings`` (field names of :class:`viddet.config.TestConfig`) overriding them.
        random_weights: no checkpoint: a randomly initialised model (pipeline checks, benchmarks).

    Raises:
        VidDetError: unknown method / backbone / setting, an unreadable checkpoint, NaN weights, or a
            checkpoint of another method or backbone (the message lists missing/unexpected keys
            and says what the file is).
    """
    cls = method_class(method) if method is not None else None
    unknown = [k for k in settings if k not in TestConfig.__dataclass_fields__]
    if unknown:
        raise VidDetError(f'unknown inference setting(s) {", ".join(unknown)}: known are '
                          f'{", ".join(TestConfig.__dataclass_fields__)}')
    if random_weights:
        cls = cls or method_class('selsa')
        cfg = _with(test or TestConfig(), settings)
        model = cls.build(backbone or 'r50', len(VID_CLASSES), **cls.settings_of(cfg))
        return LoadedModel(_ready(model, cfg), VID_CLASSES, {}, None, DEFAULT_SCALE, cfg)
    path = resolve_checkpoint(checkpoint or (cls or method_class('selsa')).default_checkpoint, progress)
    state, meta = read_checkpoint(path)
    state = _with_detector_prefix(state)
    file_cls = method_of_keys(state)
    if file_cls is None:
        raise VidDetError(f'{path} is {describe(None, None)} (first keys: {", ".join(list(state)[:4])})')
    check_finite(state, str(path))
    cls = cls or file_cls
    backbone = backbone or backbone_of_state_dict(state) or 'r50'
    names = class_names(meta)
    cfg = _with(test or (checkpoint_test_settings(meta) if cls is file_cls else TestConfig()), settings)
    if cls.name == 'single':
        model = cls.build(backbone, len(names), num_shared_fcs=file_cls.num_shared_fcs)
        ignore = tuple(p for m in METHODS for p in m.signature if p not in cls.signature) + ('motion.', 'aggregator.')
        load_into(model, {k: v for k, v in state.items() if not k.startswith(ignore)}, str(path))
    else:
        model = cls.build(backbone, len(names), **cls.settings_of(cfg))
        load_into(model, state, str(path))
    return LoadedModel(_ready(model, cfg), names, meta, path, inference_scale(meta), cfg)


def _with(cfg: TestConfig, settings: dict) -> TestConfig:
    if not settings:
        return cfg
    values = {**vars(cfg), **settings}
    return _convert(values, TestConfig, 'test', 'inference settings').check()


def _ready(model: VIDMethod, cfg: TestConfig) -> VIDMethod:
    model.eval()
    return speedups.enable(model) if cfg.fast else speedups.disable(model)
