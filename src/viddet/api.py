"""Python API: a video detector from a checkpoint, run over a video.

    from viddet import VideoDetector
    detector = VideoDetector.from_checkpoint('selsa_r50')          # zoo name, file or URL
    for result in detector.predict('video.mp4'):                     # file, frame folder, stream
        d = result.detections                                        # boxes (n, 4) in pixels
        print(result.frame.index, d.boxes, d.scores, d.labels)
    for result in detector.predict('video.mp4', link='online'):      # objects: d.track_ids (n,)
        ...
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from viddet.checkpoints.loading import load_model
from viddet.data.frames import FrameSource, LimitedSource
from viddet.data.image_sources import ArraySource
from viddet.data.sources import open_source
from viddet.data.transforms import DEFAULT_SCALE
from viddet.engine.video import FrameResult, VideoFrame, run_video
from viddet.errors import VidDetError
from viddet.methods.base import MethodSettings
from viddet.linking.link import LINK_MODES, link_video
from viddet.linking.tracker import IoUTracker
from viddet.runtime import resolve_device, set_threads
from viddet.timing import NO_TIMER, StageTimer


class VideoDetector:
    """A VID method with its weights, device, class names and inference settings, ready to run.

    Args:
        model: a :class:`viddet.methods.VIDMethod` (eval mode is set here).
        class_names: names of the model's classes (label i -> class_names[i]).
        device: torch device the model is on.
        scale: resize limits (long, short) in pixels (1000, 600).
        test: the inference settings the model was built with (the method's ``Settings``;
            recorded with the outputs); default: only the settings every method has.
        checkpoint: the file the weights came from (None: random or built in memory).
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], device: torch.device,
                 scale: Tuple[int, int] = DEFAULT_SCALE, test: Optional[MethodSettings] = None,
                 checkpoint: Optional[str] = None):
        self.model = model.eval().to(device)
        self.class_names = tuple(class_names)
        self.device = device
        self.scale = scale
        self.test = test or MethodSettings()
        self.checkpoint = checkpoint

    @property
    def method(self) -> str:
        return self.model.name

    @classmethod
    def from_checkpoint(cls, checkpoint: Optional[str] = None, method: Optional[str] = None,
                        backbone: Optional[str] = None, device: str = 'auto', random_weights: bool = False,
                        test: Optional[MethodSettings] = None, threads: Optional[int] = None,
                        **settings) -> 'VideoDetector':
        """Loads an MMTracking / mmdet / viddet checkpoint into the right method
        (:func:`viddet.checkpoints.loading.load_model`).

        Args:
            checkpoint: local path, URL or model-zoo name (``dff_r50``, ``selsa_x101``...), or an
                ONNX export folder (``viddet export``: runs on ONNX Runtime, docs/deployment.md).
                Default: the zoo checkpoint of ``method`` (SELSA R-50 when neither is given).
            method: ``single|dff|fgfa|selsa|troi``; default: what the checkpoint is. ``single``
                accepts the detector part of any VID checkpoint.
            backbone: ``r50|r101|x101|mobilenetv2``; default: what the checkpoint is.
            device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
            random_weights: skip the checkpoint, random initialisation (pipeline tests only).
            test: inference settings (the method's ``Settings``, e.g. ``SELSASettings``); default
                the checkpoint's.
            threads: torch CPU threads; default torch's own, capped at the cores this process is
                given (:func:`viddet.runtime.set_threads`).
            settings: single inference settings overriding them (fields of the method's
                ``Settings``), e.g. ``key_frame_interval=5`` (DFF), ``num_refs=7`` (SELSA),
                ``fast=False``; ``viddet test --help`` lists every method's.

        Raises:
            VidDetError: unknown method, a setting the method does not have, unreadable checkpoint, or one of another
                method/backbone (the message lists missing/unexpected keys and what the file is).
        """
        dev = resolve_device(device)
        set_threads(threads)
        loaded = load_model(checkpoint, method, backbone, test=test, random_weights=random_weights, **settings)
        return cls(loaded.model, loaded.class_names, dev, scale=loaded.scale, test=loaded.test,
                   checkpoint=None if loaded.path is None else str(loaded.path))

    def predict(self, frames: Union[str, Path, FrameSource, Iterable[np.ndarray]], mode: Optional[str] = None,
                max_frames: Optional[int] = None, timer: StageTimer = NO_TIMER,
                strict_length: bool = False, link: str = 'none', tracker: Optional[IoUTracker] = None,
                on_detected: Optional[Callable[[FrameResult], None]] = None) -> Iterator[FrameResult]:
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
            link: link the detections into objects (:mod:`viddet.linking`; the detections then have
                ``track_ids``, unique in the video):

                * ``'none'`` (default): no linking, ``track_ids`` is None.
                * ``'online'``: the causal :class:`~viddet.linking.tracker.IoUTracker` (``tracker``, or one
                  with the default thresholds; reset first), fed each frame as it is detected: every
                  box kept, ids -1 for untracked boxes, results yielded as they come, nothing read
                  ahead; works on streams. A new call starts again from id 0, so the same frames give
                  the same ids.
                * ``'seqnms'``: Seq-NMS over the whole video (rescored, suppressed boxes removed,
                  ids = tube ids). It needs every frame's detections before it yields the first
                  result, so it runs in two passes with bounded memory: pass 1 detects the whole
                  video and keeps only the detections (about 2 kB per frame: boxes, scores,
                  labels, no images); pass 2 reads the frames again from the source and yields them
                  with the linked detections (``frame.img`` is then None: the preprocessed tensor
                  is not rebuilt). It needs a source that can be read twice (a file, a folder, a
                  list of arrays), not a live stream or a one-pass iterable.
            tracker: the online tracker (its thresholds) for ``link='online'``.
            on_detected: called with each frame's result as soon as it is detected, before linking
                (progress reporting; with ``'seqnms'`` that is during pass 1).

        Raises:
            VidDetError: a source that cannot be opened or decoded, offline mode on a live source,
                an unknown ``link``, ``'seqnms'`` on a live source, a source that gives fewer
                frames on its second read.
        """
        if link not in LINK_MODES:
            raise VidDetError(f'unknown link mode {link!r}; expected one of {", ".join(LINK_MODES)}')
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
            if link == 'seqnms' and source.is_live:
                raise VidDetError(f'{source.path} is a live stream: Seq-NMS links the whole video before it '
                                  f'gives the first frame and reads the frames twice; link online instead')
            results = run_video(self.model, source, mode=mode, device=self.device, scale=self.scale,
                                timer=timer, strict_length=strict_length)
            if link == 'seqnms':
                yield from _seqnms_two_passes(results, source, on_detected)
                return
            if tracker is None and link == 'online':
                tracker = IoUTracker()
            if link == 'online':
                tracker.reset()
            for result in results:
                if on_detected is not None:
                    on_detected(result)
                if link == 'online':
                    result = dataclasses.replace(result, detections=tracker.update(result.detections))
                yield result
        finally:
            if own:
                source.close()


def _seqnms_two_passes(results: Iterator[FrameResult], source: FrameSource,
                       on_detected: Optional[Callable[[FrameResult], None]]) -> Iterator[FrameResult]:
    """:meth:`VideoDetector.predict` with ``link='seqnms'``: detect everything keeping the detections
    only, link, then read the frames again and yield them with the linked detections."""
    kept = []
    for result in results:
        if on_detected is not None:
            on_detected(result)
        kept.append((result.frame.meta, result.detections, result.stages))
    result = None   # the last frame's image too
    linked = link_video([d for _, d, _ in kept], 'seqnms', where=source.path)
    frames = iter(source)
    try:
        for i, ((meta, _, stages), det) in enumerate(zip(kept, linked)):
            frame = next(frames, None)
            if frame is None:
                raise VidDetError(f'{source.path}: the second read of the video (to draw the Seq-NMS results) '
                                  f'ended after {i} frames; the first gave {len(kept)}')
            yield FrameResult(VideoFrame(frame.index, frame.name, frame.image, None, meta), det, stages)
    finally:
        getattr(frames, 'close', lambda: None)()


def detector_from_args(args) -> VideoDetector:
    """The :class:`VideoDetector` that parsed ``viddet demo`` / ``test`` options describe:
    ``--threads`` set, ``--set test.KEY=VALUE`` applied on top of the checkpoint's own settings.

    Raises:
        VidDetError: as :meth:`VideoDetector.from_checkpoint`, bad ``--set`` / ``--threads``.
    """
    from viddet.config.files import parse_test_overrides
    detector = VideoDetector.from_checkpoint(args.checkpoint, method=args.method, backbone=args.backbone,
                                             device=args.device, random_weights=getattr(args, 'random_weights', False),
                                             threads=args.threads, **parse_test_overrides(args.overrides))
    return detector
