"""Python API: build a video detector from a checkpoint and run it over a video.

    from viddet import VideoDetector
    detector = VideoDetector.from_checkpoint('selsa_r50')          # zoo name, file or URL
    for result in detector.predict('video.mp4'):                     # file, frame folder, stream
        d = result.detections                                        # boxes (n, 4) in pixels
        print(result.frame.index, d.boxes, d.scores, d.labels)
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from viddet import VidDetError
from viddet.checkpoints import (DEFAULT_CHECKPOINT, class_names, describe, describe_state_dict, load_into,
                                read_checkpoint, resolve_checkpoint)
from viddet.data.transforms import DEFAULT_SCALE
from viddet.engine.video import FrameResult, StageTimer, run_video
from viddet.methods import METHODS, build_method

# Keys of a temporal checkpoint that the single-frame model leaves unused.
_SINGLE_IGNORES = ('motion.', 'aggregator.', 'detector.roi_head.bbox_head.aggregator.',
                   'detector.roi_head.bbox_roi_extractor.')


def resolve_device(device: str = 'auto') -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device.

    Raises:
        VidDetError: CUDA requested but not available.
    """
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise VidDetError(f'device {device!r} requested but this PyTorch sees no CUDA GPU: use --device cpu')
    return dev


def _normalise_state(state: dict) -> dict:
    """A plain mmdet Faster R-CNN state dict (``backbone.*``, ``rpn_head.*``...) gets the
    ``detector.`` prefix that MMTracking's VID models use."""
    if any(k.startswith('detector.') for k in state):
        return state
    return {f'detector.{k}': v for k, v in state.items()}


class VideoDetector:
    """A VID method with its weights, device and class names, ready to run on videos.

    Args:
        model: a ``viddet.methods`` module (eval mode is set here).
        class_names: names of the model's classes (label i -> class_names[i]).
        device: torch device the model is on.
        scale: resize limits (long, short) in pixels (1000, 600).
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], device: torch.device,
                 scale: Tuple[int, int] = DEFAULT_SCALE):
        self.model = model.eval().to(device)
        self.class_names = tuple(class_names)
        self.device = device
        self.scale = scale

    @property
    def method(self) -> str:
        return self.model.method

    @classmethod
    def from_checkpoint(cls, checkpoint: Optional[str] = None, method: Optional[str] = None,
                        backbone: Optional[str] = None, device: str = 'auto', random_weights: bool = False,
                        **method_kwargs) -> 'VideoDetector':
        """Loads an MMTracking / mmdet / viddet checkpoint into the right method.

        Args:
            checkpoint: local path, URL or model-zoo name (``dff_r50``, ``selsa_x101``...).
                Default: the zoo checkpoint of ``method`` (:data:`viddet.checkpoints.DEFAULT_CHECKPOINT`).
            method: ``single|dff|fgfa|selsa|troi``; default: what the checkpoint is. ``single``
                accepts the detector part of any VID checkpoint.
            backbone: ``r50|r101|x101|mobilenetv2``; default: what the checkpoint is.
            device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
            random_weights: skip the checkpoint, random initialisation (pipeline tests only).
            method_kwargs: passed to the method (``key_frame_interval``, ``ref_cache``...); they
                override the checkpoint's own test settings (:func:`checkpoint_test_settings`).

        Raises:
            VidDetError: unknown method, unreadable checkpoint, or one of another method/backbone
                (the message lists missing/unexpected keys and what the file is).
        """
        if method is not None and method not in METHODS:
            raise VidDetError(f'unknown method {method!r}: choose one of {", ".join(METHODS)}')
        dev = resolve_device(device)
        if random_weights:
            method = method or 'selsa'
            model = build_method(method, backbone or 'r50', **method_kwargs)
            return cls(model, build_names(None), dev)
        spec = checkpoint or DEFAULT_CHECKPOINT[method or 'selsa']
        path = resolve_checkpoint(spec)
        state, meta = read_checkpoint(path)
        state = _normalise_state(state)
        file_method, file_backbone = describe_state_dict(state)
        if file_method is None:
            raise VidDetError(f'{path} is {describe(None, None)} (first keys: {", ".join(list(state)[:4])})')
        method = method or file_method
        backbone = backbone or file_backbone or 'r50'
        names = class_names(meta)
        if method == 'single':
            n_fcs = 3 if file_method == 'troi' else 2
            model = build_method('single', backbone, len(names), num_shared_fcs=n_fcs, **method_kwargs)
            load_into(model, state, str(path), ignore_prefixes=_SINGLE_IGNORES)
        else:
            # a viddet checkpoint's own test-time settings (e.g. FGFA's window) unless overridden
            kwargs = {**checkpoint_test_settings(meta), **method_kwargs} if method == file_method else method_kwargs
            model = build_method(method, backbone, len(names), **kwargs)
            load_into(model, state, str(path))
        return cls(model, names, dev, scale=inference_scale(meta))

    def predict(self, frames: Union[str, Path, Iterable[np.ndarray]], mode: Optional[str] = None,
                max_frames: Optional[int] = None, timer: Optional[StageTimer] = None) -> Iterator[FrameResult]:
        """Runs the method over a video and yields one :class:`FrameResult` per frame, in order.

        Args:
            frames: a video file, a frame folder, a camera / stream spec (see
                :func:`viddet.data.sources.open_source`), a ``FrameSource``, or a sequence / iterable
                of (H, W, 3) uint8 BGR arrays.
            mode: ``offline`` (MMTracking's test protocol; may look at future frames) or ``online``
                (causal). Default: online for live sources and plain iterables, offline otherwise.
            max_frames: stop after this many frames.
        """
        from viddet.data.sources import FrameSource, open_source
        if isinstance(frames, (str, Path)):
            source = open_source(str(frames), max_frames=max_frames)
        elif isinstance(frames, FrameSource):
            source = frames
        else:
            yield from self._predict_arrays(frames, mode, max_frames, timer)
            return
        if mode is None:
            mode = 'online' if source.is_live else 'offline'
        if mode == 'offline' and source.is_live:
            raise VidDetError(f'{source.path} is a live source: offline mode needs future frames; use --mode online')
        fetch = None if source.is_live else (lambda i: tuple(source.get(i))[1:])
        stream, length = source, source.length
        if max_frames is not None and isinstance(frames, FrameSource):  # a path got it in open_source
            stream = islice(source, max_frames)
            length = None if length is None else min(length, max_frames)
        try:
            yield from run_video(self.model, stream, mode=mode, length=length, fetch=fetch,
                                 device=self.device, scale=self.scale, timer=timer)
        finally:
            if not isinstance(frames, FrameSource):
                source.close()

    def _predict_arrays(self, frames, mode, max_frames, timer):
        if isinstance(frames, Sequence):
            frames = list(frames)[:max_frames]
            items = [(i, f'{i:06d}', np.asarray(f)) for i, f in enumerate(frames)]
            fetch = (lambda i: items[i][1:])
            yield from run_video(self.model, iter(items), mode=mode or 'offline', length=len(items), fetch=fetch,
                                 device=self.device, scale=self.scale, timer=timer)
            return
        # islice stops pulling at max_frames (a filter in the generator would drain an endless camera iterator)
        stream = ((i, f'{i:06d}', np.asarray(f)) for i, f in islice(enumerate(frames), max_frames))
        yield from run_video(self.model, stream, mode=mode or 'online', device=self.device, scale=self.scale,
                             timer=timer)


def inference_scale(meta: dict) -> Tuple[int, int]:
    """Resize limits a checkpoint was trained for: ``data.scale`` of a viddet training config in
    ``meta['config']``, else MMTracking's (1000, 600)."""
    cfg = meta.get('config') if isinstance(meta, dict) else None
    scale = cfg.get('data', {}).get('scale') if isinstance(cfg, dict) else None
    if isinstance(scale, (list, tuple)) and len(scale) == 2:
        return int(scale[0]), int(scale[1])
    return DEFAULT_SCALE


def checkpoint_test_settings(meta: dict) -> dict:
    """Test-time method settings a checkpoint was trained and evaluated with: ``model.test`` of a viddet
    training config in ``meta['config']`` (e.g. ``{'num_left': 5, 'num_right': 5}`` for FGFA,
    ``key_frame_interval`` for DFF, ``num_refs`` for SELSA), so that ``viddet test``/``demo`` score a
    checkpoint exactly as its training run's evaluation did; ``{}`` for MMTracking checkpoints (whose
    ``meta['config']`` is mmcv config text: the methods' defaults are MMTracking's test settings)."""
    cfg = meta.get('config') if isinstance(meta, dict) else None
    model = cfg.get('model') if isinstance(cfg, dict) else None
    test = model.get('test') if isinstance(model, dict) else None
    return dict(test) if isinstance(test, dict) else {}


def build_names(meta) -> Tuple[str, ...]:
    """Class names from a checkpoint meta, or the 30 ImageNet VID classes."""
    return class_names(meta or {})
