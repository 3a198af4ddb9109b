"""Python API: a video detector from a checkpoint, run over a video.

    from viddet import VideoDetector
    detector = VideoDetector.from_checkpoint('selsa_r50')          # zoo name, file or URL
    for result in detector.predict('video.mp4'):                     # file, frame folder, stream
        d = result.detections                                        # boxes (n, 4) in pixels
        print(result.frame.index, d.boxes, d.scores, d.labels)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from viddet.checkpoints import load_model
from viddet.config import TestConfig
from viddet.data.sources import ArraySource, FrameSource, LimitedSource, open_source
from viddet.data.transforms import DEFAULT_SCALE
from viddet.engine.video import FrameResult, run_video
from viddet.runtime import resolve_device
from viddet.timing import NO_TIMER, StageTimer


class VideoDetector:
    """A VID method with its weights, device, class names and inference settings, ready to run.

    Args:
        model: a :class:`viddet.methods.VIDMethod` (eval mode is set here).
        class_names: names of the model's classes (label i -> class_names[i]).
        device: torch device the model is on.
        scale: resize limits (long, short) in pixels (1000, 600).
        test: the inference settings the model was built with (recorded with the outputs).
        checkpoint: the file the weights came from (None: random or built in memory).
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], device: torch.device,
                 scale: Tuple[int, int] = DEFAULT_SCALE, test: Optional[TestConfig] = None,
                 checkpoint: Optional[str] = None):
        self.model = model.eval().to(device)
        self.class_names = tuple(class_names)
        self.device = device
        self.scale = scale
        self.test = test or TestConfig()
        self.checkpoint = checkpoint

    @property
    def method(self) -> str:
        return self.model.name

    @classmethod
    def from_checkpoint(cls, checkpoint: Optional[str] = None, method: Optional[str] = None,
                        backbone: Optional[str] = None, device: str = 'auto', random_weights: bool = False,
                        test: Optional[TestConfig] = None, **settings) -> 'VideoDetector':
        """Loads an MMTracking / mmdet / viddet checkpoint into the right method
        (:func:`viddet.checkpoints.load_model`).

        Args:
            checkpoint: local path, URL or model-zoo name (``dff_r50``, ``selsa_x101``...).
                Default: the zoo checkpoint of ``method`` (SELSA R-50 when neither is given).
            method: ``single|dff|fgfa|selsa|troi``; default: what the checkpoint is. ``single``
                accepts the detector part of any VID checkpoint.
            backbone: ``r50|r101|x101|mobilenetv2``; default: what the checkpoint is.
            device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
            random_weights: skip the checkpoint, random initialisation (pipeline tests only).
            test: inference settings (:class:`viddet.config.TestConfig`); default the checkpoint's.
            settings: single inference settings overriding them, e.g. ``key_frame_interval=5``,
                ``num_refs=7``, ``fast=False``.

        Raises:
            VidDetError: unknown method or setting, unreadable checkpoint, or one of another
                method/backbone (the message lists missing/unexpected keys and what the file is).
        """
        dev = resolve_device(device)
        loaded = load_model(checkpoint, method, backbone, test=test, random_weights=random_weights, **settings)
        return cls(loaded.model, loaded.class_names, dev, scale=loaded.scale, test=loaded.test,
                   checkpoint=None if loaded.path is None else str(loaded.path))

    def predict(self, frames: Union[str, Path, FrameSource, Iterable[np.ndarray]], mode: Optional[str] = None,
                max_frames: Optional[int] = None, timer: StageTimer = NO_TIMER,
                strict_length: bool = False) -> Iterator[FrameResult]:
        """Runs the method over a video and yields one :class:`FrameResult` per frame, in order.

        Args:
            frames: a video file, a frame folder, a camera / stream spec (see
                :func:`viddet.data.sources.open_source`), a ``FrameSource``, or a sequence / iterable
                of (H, W, 3) uint8 BGR arrays (a sequence has random access; an iterable is read once,
                like a stream).
            mode: ``offline`` (MMTracking's test protocol; may look at future frames) or ``online``
                (causal). Default: online for live sources and plain iterables, offline otherwise.
            max_frames: stop after this many frames.
            timer: a :class:`viddet.timing.StageTimer` for per-stage times.
            strict_length: a video shorter than its container says is an error (else a warning).

        Raises:
            VidDetError: a source that cannot be opened or decoded, offline mode on a live source.
        """
        own = not isinstance(frames, FrameSource)
        if isinstance(frames, (str, Path)):
            source = open_source(str(frames), max_frames=max_frames)
        elif isinstance(frames, FrameSource):
            source = frames if max_frames is None else LimitedSource(frames, max_frames)
        else:
            source = ArraySource(frames, max_frames=max_frames)
        if mode is None:
            mode = 'online' if source.is_live else 'offline'
        try:
            yield from run_video(self.model, source, mode=mode, device=self.device, scale=self.scale,
                                 timer=timer, strict_length=strict_length)
        finally:
            if own:
                source.close()


def detector_from_args(args) -> VideoDetector:
    """The :class:`VideoDetector` that parsed ``viddet demo`` / ``test`` options describe:
    ``--threads`` set, ``--set test.KEY=VALUE`` applied on top of the checkpoint's own settings.

    Raises:
        VidDetError: as :meth:`VideoDetector.from_checkpoint`, bad ``--set`` / ``--threads``.
    """
    from viddet.config import parse_test_settings
    from viddet.runtime import set_threads
    set_threads(args.threads)
    detector = VideoDetector.from_checkpoint(args.checkpoint, method=args.method, backbone=args.backbone,
                                             device=args.device, random_weights=getattr(args, 'random_weights', False),
                                             **parse_test_settings(args.overrides))
    ignored = detector.test.ignored_by(detector.method)
    if ignored:
        import sys
        print(f'viddet: note: {detector.model.title} does not use test.{", test.".join(ignored)}', file=sys.stderr)
    return detector
