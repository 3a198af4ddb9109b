"""Checkpoint tensors into a model: strict loading with a message that says what the file is,
partial loading (ImageNet backbones, fine-tuning), and :func:`load_model`, the one way every command
and the Python API turn a checkpoint into a ready model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from viddet import speedups
from viddet.checkpoints.download import resolve_checkpoint
from viddet.checkpoints.reading import (check_finite, class_names, describe, describe_state_dict, read_checkpoint,
                                        with_detector_prefix)
from viddet.classes import VID_CLASSES
from viddet.config.typed import method_settings
from viddet.data.transforms import DEFAULT_SCALE
from viddet.errors import VidDetError
from viddet.export import is_export, load_export
from viddet.methods import VIDMethod, method_class, method_of_checkpoint
from viddet.methods.base import MethodSettings
from viddet.models.backbones import backbone_of_state_dict
from viddet.runtime import cpu_kernels


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
        test: the inference settings in force (the method's ``Settings``).
    """
    model: VIDMethod
    class_names: Tuple[str, ...]
    meta: dict
    path: Optional[Path]
    scale: Tuple[int, int]
    test: MethodSettings


def checkpoint_test_settings(meta: dict, method) -> MethodSettings:
    """The inference settings a viddet checkpoint was trained and evaluated with (``model.test`` of
    the training config in ``meta['config']``, e.g. FGFA's ±5 window, over ``method.Settings``'
    defaults), so that ``viddet test`` and ``demo`` score it as its training run did; the defaults
    (MMTracking's) for MMTracking checkpoints (whose ``meta['config']`` is mmcv config text).

    Raises:
        VidDetError: a ``model.test`` entry the method does not have (another viddet version?).
    """
    cfg = meta.get('config') if isinstance(meta, dict) else None
    model = cfg.get('model') if isinstance(cfg, dict) else None
    test = model.get('test') if isinstance(model, dict) else None
    return method_settings(method, test if isinstance(test, dict) else {}, 'checkpoint meta', 'model.test')


def inference_scale(meta: dict) -> Tuple[int, int]:
    """Resize limits a checkpoint was trained for: ``data.scale`` of a viddet training config in
    ``meta['config']``, else MMTracking's (1000, 600)."""
    cfg = meta.get('config') if isinstance(meta, dict) else None
    scale = cfg.get('data', {}).get('scale') if isinstance(cfg, dict) else None
    if isinstance(scale, (list, tuple)) and len(scale) == 2:
        return int(scale[0]), int(scale[1])
    return DEFAULT_SCALE


def load_model(checkpoint: Optional[str] = None, method: Optional[str] = None, backbone: Optional[str] = None,
               test: Optional[MethodSettings] = None, random_weights: bool = False, progress: bool = True,
               **settings) -> LoadedModel:
    """The one way from a checkpoint to a ready model (CLI, Python API, benchmark, training's
    evaluation and initialisation).

    Args:
        checkpoint: local path, URL or model-zoo name (``dff_r50``, ``selsa_x101``...), or an ONNX
            export folder (``viddet export``: :func:`viddet.export.load_export`, stages on ONNX
            Runtime; ``method`` / ``backbone`` must then be what it holds). Default:
            the zoo checkpoint of ``method`` (``default_checkpoint`` of its class; SELSA's).
        method: ``single|dff|fgfa|selsa|troi``; default: the method the checkpoint's meta names,
            else what its keys show. ``single`` accepts the detector part of any VID checkpoint.
        backbone: default: what the checkpoint is.
        test: inference settings (the method's ``Settings``); default the checkpoint's own
            (:func:`checkpoint_test_settings`), with ``settings`` (fields of the method's
            ``Settings``, e.g. ``num_refs=7``) overriding them.
        random_weights: no checkpoint: a randomly initialised model (pipeline checks, benchmarks).

    Raises:
        VidDetError: unknown method / backbone / setting, an unreadable checkpoint, NaN weights, or a
            checkpoint of another method or backbone (the message lists missing/unexpected keys
            and says what the file is).
    """
    if is_export(checkpoint):   # an ONNX export folder: its stages on ONNX Runtime
        exp = load_export(checkpoint, method, backbone, test, **settings)
        return LoadedModel(exp.model, exp.class_names, exp.meta, exp.path, exp.scale, exp.test)
    cls = method_class(method) if method is not None else None
    if random_weights:
        cls = cls or method_class('selsa')
        cfg = _with(cls, test or cls.Settings(), settings)
        model = cls.build(backbone or 'r50', len(VID_CLASSES), **cfg.build_kwargs())
        return LoadedModel(_ready(model, cfg), VID_CLASSES, {}, None, DEFAULT_SCALE, cfg)
    if checkpoint is None:
        checkpoint = (cls or method_class('selsa')).default_checkpoint
        if checkpoint is None:
            raise VidDetError(f'method {cls.name} has no published checkpoint to default to: '
                              f'pass --checkpoint (a file of a training run, or a URL)')
    path = resolve_checkpoint(checkpoint, progress)
    state, meta = read_checkpoint(path)
    file_cls = method_of_checkpoint(state, meta)
    if file_cls is None:   # a plain mmdet Faster R-CNN file: its keys without the detector. prefix
        state = with_detector_prefix(state)
        file_cls = method_of_checkpoint(state, {})
    if file_cls is None:
        raise VidDetError(f'{path} is {describe(None, None)} (first keys: {", ".join(list(state)[:4])})')
    check_finite(state, str(path))
    cls = cls or file_cls
    backbone = backbone or backbone_of_state_dict(state) or 'r50'
    names = class_names(meta)
    cfg = _with(cls, test or (checkpoint_test_settings(meta, cls) if cls is file_cls else cls.Settings()), settings)
    state = cls.checkpoint_state(state)
    model = cls.build_for_checkpoint(backbone, len(names), state, **cfg.build_kwargs())
    load_into(model, state, str(path))
    return LoadedModel(_ready(model, cfg), names, meta, path, inference_scale(meta), cfg)


def _with(method, cfg: MethodSettings, settings: dict) -> MethodSettings:
    """``cfg`` with ``settings`` (plain values, checked against ``method.Settings``) over it."""
    if not settings:
        return cfg
    return method_settings(method, {**cfg.values(), **settings}, 'inference settings')


def _ready(model: VIDMethod, cfg: MethodSettings) -> VIDMethod:
    model.eval()
    return speedups.convert(model, cpu_kernels()) if cfg.fast else speedups.revert(model)
