"""Checkpoint loading: MMTracking 0.x/1.x files, plain mmdet Faster R-CNN files, viddet's own files,
and the MMTracking model zoo (names -> URL -> verified download into a local cache).

MMTracking saves ``{"state_dict": ..., "meta": {"CLASSES": ...}}`` (REFERENCE.md §7); keys are
``detector.*`` (+ ``motion.*`` for DFF/FGFA, ``aggregator.*`` for FGFA). viddet modules use the same
attribute names, so a file loads with ``strict=True`` and no renaming.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from viddet import VID_CLASSES, VidDetError

ZOO_BASE = 'https://download.openmmlab.com/mmtracking/'

# name -> path under ZOO_BASE (REFERENCE.md §10.1; MMTracking's VID READMEs).
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

# Default checkpoint per method: the model-zoo file a user would want first.
# 'single' uses the detector part of SELSA R-50 (MMTracking publishes no single-frame VID model).
DEFAULT_CHECKPOINT = {'single': 'selsa_r50', 'dff': 'dff_r50', 'fgfa': 'fgfa_r50',
                      'selsa': 'selsa_r50', 'troi': 'troi_r50'}

METHOD_NAMES = {'single': 'single-frame Faster R-CNN', 'dff': 'DFF', 'fgfa': 'FGFA', 'selsa': 'SELSA',
                'troi': 'SELSA + Temporal RoI Align'}
BACKBONE_NAMES = {'r50': 'R-50', 'r101': 'R-101', 'x101': 'X-101', 'mobilenetv2': 'MobileNetV2-lite'}


def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$VIDDET_HOME/checkpoints`` (default ``~/.cache/viddet``)."""
    return Path(os.environ.get('VIDDET_HOME', Path.home() / '.cache' / 'viddet')) / 'checkpoints'


def zoo_url(name: str) -> str:
    """Published URL of a model-zoo name (``$VIDDET_ZOO_BASE`` overrides the server, for mirrors)."""
    return os.environ.get('VIDDET_ZOO_BASE', ZOO_BASE).rstrip('/') + '/' + MODEL_ZOO[name]


def _hash_prefix(filename: str) -> Optional[str]:
    m = re.search(r'-([0-9a-f]{8,64})\.pth$', filename)
    return m.group(1) if m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, progress: bool = True) -> Path:
    """Downloads ``url`` to ``dest`` atomically, with a progress bar, verifying the hash prefix.

    The file name's ``-<hex>.pth`` suffix (MMTracking's publish convention) must be a prefix of
    the file's SHA-256.

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
                    f'it elsewhere and put it at {dest}, or pass --checkpoint /path/to/file.pth') from None
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


def read_checkpoint(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Reads a checkpoint file with ``torch.load(weights_only=True)``.

    Returns:
        (state_dict, meta): the ``state_dict`` entry when present (MMTracking/mmdet/viddet), else
        the bare dict; ``meta`` is the file's ``meta`` dict or {}.

    Raises:
        VidDetError: not a readable torch file, or no tensors in it.
    """
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error means "not a checkpoint"
        raise VidDetError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: '
                          f'{str(e).splitlines()[0][:200]})') from None
    if not isinstance(obj, dict):
        raise VidDetError(f'{path} holds a {type(obj).__name__}, not a checkpoint dict')
    state = obj.get('state_dict', obj.get('model', obj))
    meta = obj.get('meta') or {}
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise VidDetError(f'{path} contains no model weights (keys: {list(obj)[:8]})')
    return state, meta if isinstance(meta, dict) else {}


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
    """Guesses (method, backbone) of a state dict from its keys, e.g. ('selsa', 'r101').

    Method: ``troi`` (Temporal RoI Align extractor), ``selsa`` (bbox-head aggregators), ``fgfa``
    (motion + embed aggregator), ``dff`` (motion only), ``single`` (a detector alone, with or
    without the ``detector.`` prefix). Backbone from layer3's block count and layer1's conv2 groups.
    """
    keys = state.keys()
    prefix = 'detector.' if any(k.startswith('detector.') for k in keys) else ''
    if any('bbox_roi_extractor.embed_network' in k for k in keys):
        method = 'troi'
    elif any('bbox_head.aggregator.' in k for k in keys):
        method = 'selsa'
    elif any(k.startswith('motion.') for k in keys):
        method = 'fgfa' if any(k.startswith('aggregator.') for k in keys) else 'dff'
    elif any(k.startswith(prefix + 'backbone.') for k in keys):
        method = 'single'
    else:
        return None, None
    backbone = None
    n3 = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r'backbone\.layer3\.(\d+)\.', k))}
    if n3:
        depth = {6: 50, 23: 101, 36: 152}.get(max(n3) + 1)
        w = state.get(prefix + 'backbone.layer1.0.conv2.weight')
        grouped = w is not None and w.shape[1] != w.shape[0]
        backbone = ('x' if grouped else 'r') + str(depth) if depth else None
    elif any(k.startswith(prefix + 'backbone.features.') for k in keys):
        backbone = 'mobilenetv2'
    return method, backbone


def describe(method: Optional[str], backbone: Optional[str]) -> str:
    """'a SELSA R-101 checkpoint' style description."""
    if method is None:
        return 'not a Faster R-CNN / MMTracking VID checkpoint'
    return f'a {METHOD_NAMES[method]} {BACKBONE_NAMES.get(backbone, backbone or "(unknown backbone)")} checkpoint'


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
