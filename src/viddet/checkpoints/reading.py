"""Reading a checkpoint file safely (``weights_only``), and what it holds: tensors, meta, class names,
which method and backbone it is."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from viddet.checkpoints.download import cache_dir
from viddet.classes import VID_CLASSES
from viddet.errors import VidDetError
from viddet.methods import METHOD_NAMES, method_class, method_of_keys
from viddet.models.backbones import backbone_info, backbone_of_state_dict


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
    (``backbone.*``, ...) count with a ``detector.`` prefix when no method matches them as they are."""
    cls = method_of_keys(state)
    if cls is None:
        state = with_detector_prefix(state)
        cls = method_of_keys(state)
    if cls is None:
        return None, None
    return cls.name, backbone_of_state_dict(state)


def describe(method: Optional[str], backbone: Optional[str]) -> str:
    """'a SELSA R-101 checkpoint' style description."""
    if method is None:
        return f'not a checkpoint of a method viddet knows ({", ".join(METHOD_NAMES)})'
    title = backbone_info(backbone).title if backbone else '(unknown backbone)'
    return f'a {method_class(method).title} {title} checkpoint'


def with_detector_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A plain mmdet Faster R-CNN state dict (``backbone.*``, ``rpn_head.*``...) gets the
    ``detector.`` prefix that MMTracking's VID models use."""
    if any(k.startswith('detector.') for k in state):
        return state
    return {f'detector.{k}': v for k, v in state.items()}


def check_finite(state: Dict[str, torch.Tensor], source: str) -> None:
    """Raises :class:`VidDetError` naming the tensors of ``state`` that hold NaN or infinity (a
    diverged training run: such a model detects nothing)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''
        raise VidDetError(f'{source} has NaN or infinite weights in {len(bad)} tensor(s): '
                          f'{", ".join(bad[:3])}{more}; it comes from a diverged training run and '
                          f'would detect nothing')

