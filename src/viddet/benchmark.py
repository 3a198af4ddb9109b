"""Inference speed and memory of a method on a synthetic (or any) video: ``viddet benchmark``.

What is measured (issue #6):

* **Latency per frame**: wall time from asking the engine (:func:`viddet.engine.video.run_video`)
  for a frame's detections until it yields them, *excluding* the time spent producing the input
  frames (decoding, or here generating synthetic frames; also for the random-access ``fetch`` of
  SELSA's references). Preprocessing (resize, normalise, pad), the model, post-processing and the
  copy of the detections to the CPU are included. Median, 90th percentile and mean over the timed
  frames; ``fps = 1000 / mean latency``.
* **Warm-up**: the first ``warmup`` frames of the video are run but not timed. They absorb one-off
  costs: allocator growth, oneDNN kernel selection, and the per-video set-up of the methods
  (offline SELSA/TRoI compute their 14 reference frames on the first frame, offline FGFA fills
  its 31-frame window). Their latencies are reported separately (``warmup_latency_ms``).
* **Per-stage breakdown** (``stages_ms``): the mean milliseconds per timed frame in each stage of
  the :class:`~viddet.engine.video.StageTimer` (backbone, flow, rpn, roi_head, aggregation, nms);
  ``other`` is the rest of the latency (preprocessing, Python overhead).
* **Peak memory** over the whole video (:class:`viddet.peak_memory.PeakMemory`): on CUDA the
  allocated bytes (weights included), on the CPU the peak resident set size minus the size just
  before the video (the weights, loaded before, excluded).
* **CPU kernels** (``cpu_kernels``): the choice the fast modules run
  (:class:`viddet.runtime.CpuKernels`; None with the plain modules): a time is only comparable with
  one taken on the same choice.

Synthetic frames: smooth random images (bilinear up-sampled low-resolution noise, like blurry
natural images) drifting by a few pixels per frame, generated on demand from one base image so
that producing them costs nothing and holds no memory per frame. Unless a checkpoint is given the
weights are random (PyTorch's default initialisation, seed 0): the cost of the network does not
depend on the weight values. The post-processing cost can (how many boxes pass the 1e-4 score
threshold into NMS), so for NMS-sensitive numbers pass a real checkpoint with ``--checkpoint``.

Automatic mixed precision (``--amp bf16|fp16``) wraps the whole forward in
``torch.autocast(device_type, dtype)``. Parity with MMTracking is guaranteed only at fp32 (the
default); with AMP the detections change.
"""
from __future__ import annotations

import os
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch

from viddet import speedups
from viddet.checkpoints.loading import load_model
from viddet.data.frames import Frame, FrameSource
from viddet.engine.video import MODES, run_video
from viddet.errors import VidDetError
from viddet.export import is_export, read_manifest
from viddet.fileio import atomic_write_json
from viddet.methods import method_class
from viddet.peak_memory import PeakMemory
from viddet.runtime import CpuKernels, resolve_device, set_threads
from viddet.timing import StageTimer

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
STAGES = ('backbone', 'flow', 'rpn', 'roi_head', 'aggregation', 'nms')


# ---------------------------------------------------------------------------------- frames
class SyntheticVideo(FrameSource):
    """Smooth random BGR frames of a fixed size, generated on demand (a :class:`FrameSource`).

    A base image a little larger than the frame is made once from low-resolution uniform noise
    (one random value per ``cell`` pixels, bilinear up-sampling, per channel); frame ``i`` is the
    window of that base shifted by ``i * step`` pixels (wrapping around), so consecutive frames
    show the same smooth content moving, like a panning camera. ``seconds`` accumulates the time
    spent producing frames for random access (``get``, in the caller's thread), so that latencies
    can exclude it; frames for iteration are made by the prefetch thread.

    Args:
        width, height: frame size in pixels.
        length: number of frames.
        seed: random seed of the base image.
        cell: size in pixels of one noise cell (smoothness).
        step: (dx, dy) drift per frame in pixels.

    Raises:
        VidDetError: non-positive sizes or length.
    """

    def __init__(self, width: int, height: int, length: int, seed: int = 0, cell: int = 16,
                 step: Tuple[int, int] = (3, 2)):
        if width < 1 or height < 1 or length < 1:
            raise VidDetError(f'synthetic video: size {width}x{height} and length {length} must be positive')
        super().__init__(f'<synthetic {width}x{height}x{length}>')
        self.width, self.height, self.length = width, height, length
        self.step = step
        self.margin = 64
        self.seconds = 0.0
        rng = np.random.default_rng(seed)
        bw, bh = width + self.margin, height + self.margin
        low = rng.integers(0, 256, size=(bh // cell + 2, bw // cell + 2, 3), dtype=np.uint8)
        self.base = cv2.resize(low, (bw, bh), interpolation=cv2.INTER_LINEAR)

    def frame(self, index: int) -> np.ndarray:
        """(height, width, 3) uint8 BGR image of frame ``index`` (a fresh, contiguous copy)."""
        dx = (index * self.step[0]) % self.margin
        dy = (index * self.step[1]) % self.margin
        return np.ascontiguousarray(self.base[dy:dy + self.height, dx:dx + self.width])

    def __len__(self) -> int:
        return self.length

    def _frames(self) -> Iterator[Frame]:
        for i in range(self.length):
            yield Frame(i, f'{i:06d}', self.frame(i))

    def _read(self, index: int) -> Frame:
        t0 = time.perf_counter()
        frame = Frame(index, f'{index:06d}', self.frame(index))
        self.seconds += time.perf_counter() - t0
        return frame


# ---------------------------------------------------------------------------------- benchmark
@dataclass
class BenchmarkResult:
    """Outcome of :func:`benchmark`; :meth:`as_dict` is the ``--json`` record."""

    method: str
    backbone: str
    device: str
    size: Tuple[int, int]
    frames: int
    warmup: int
    latencies_ms: List[float]
    warmup_latencies_ms: List[float]
    stages_ms: Dict[str, float]
    peak_memory_mb: Optional[float]
    memory_kind: str
    memory_mb_per_frame: List[Optional[float]] = field(default_factory=list)
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def latency_ms_median(self) -> float:
        return float(statistics.median(self.latencies_ms))

    @property
    def latency_ms_p90(self) -> float:
        return float(np.percentile(np.asarray(self.latencies_ms), 90))

    @property
    def latency_ms_mean(self) -> float:
        return float(np.mean(self.latencies_ms))

    @property
    def fps(self) -> float:
        return 1000.0 / self.latency_ms_mean

    def as_dict(self) -> dict:
        r = lambda v: None if v is None else round(float(v), 3)  # noqa: E731
        out = {
            'method': self.method, 'backbone': self.backbone, 'device': self.device,
            'size': f'{self.size[0]}x{self.size[1]}', 'frames': self.frames,
            'fps': r(self.fps), 'latency_ms_median': r(self.latency_ms_median),
            'latency_ms_p90': r(self.latency_ms_p90), 'peak_memory_mb': r(self.peak_memory_mb),
            'stages_ms': {k: r(v) for k, v in self.stages_ms.items()},
            'latency_ms_mean': r(self.latency_ms_mean), 'warmup': self.warmup,
            'warmup_latency_ms': [r(v) for v in self.warmup_latencies_ms],
            'memory_kind': self.memory_kind,
            'latency_ms_per_frame': [r(v) for v in self.latencies_ms],
            'memory_mb_per_frame': [r(v) for v in self.memory_mb_per_frame],
        }
        out.update(self.extra)
        return out

    def summary(self) -> str:
        lines = [f'{self.method} {self.backbone} on {self.device}, {self.size[0]}x{self.size[1]}, '
                 f'{self.frames} timed frames after {self.warmup} warm-up',
                 f'  fps {self.fps:.3f}   latency median {self.latency_ms_median:.1f} ms   '
                 f'p90 {self.latency_ms_p90:.1f} ms   mean {self.latency_ms_mean:.1f} ms',
                 '  stages (ms/frame): ' + ', '.join(f'{k} {v:.1f}' for k, v in self.stages_ms.items()),
                 f'  peak memory {self.peak_memory_mb if self.peak_memory_mb is None else round(self.peak_memory_mb, 1)} MB'
                 f' ({self.memory_kind})']
        kernels = self.extra.get('cpu_kernels')
        if self.device == 'cpu':
            lines.append(f"  {'CPU kernels: ' + str(CpuKernels(**kernels)) if kernels else 'plain modules'}; "
                         f"{self.extra.get('torch_threads')} thread(s), torch {self.extra.get('torch')}")
        return '\n'.join(lines)


MAX_SIDE = 8192
"""The largest frame side ``--size`` accepts: above 8K video (7680x4320), well inside OpenCV's
limits (a side below 32767, a frame below 2^31 bytes); at 8192x8192 one stride-4 ResNet feature map
(256 channels, fp32) already takes 4.3 GB."""


def parse_size(text: str) -> Tuple[int, int]:
    """``'1000x600'`` -> (1000, 600) (width, height in pixels).

    Raises:
        VidDetError: not two positive integers separated by 'x', or a side above :data:`MAX_SIDE`.
    """
    m = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text or '')
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise VidDetError(f'--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1000x600')
    w, h = int(m.group(1)), int(m.group(2))
    if max(w, h) > MAX_SIDE:
        raise VidDetError(f'--size {w}x{h}: each side must be at most {MAX_SIDE} pixels (8K video is 7680x4320; '
                          f'a larger frame exceeds what OpenCV resizes and the memory of the feature maps)')
    return w, h


def build_model(method: str, backbone: str, checkpoint: Optional[str] = None, seed: int = 0,
                **settings) -> torch.nn.Module:
    """The method in eval mode (:func:`viddet.checkpoints.load_model`), with random weights (seed
    ``seed``) or those of ``checkpoint``; ``settings`` are inference settings (``ref_cache``, ``fast``).

    Raises:
        VidDetError: unknown method/backbone, unreadable or mismatching checkpoint.
    """
    torch.manual_seed(seed)
    return load_model(checkpoint, method, backbone, random_weights=checkpoint is None, **settings).model


def benchmark(method: str = 'single', backbone: str = 'r50', size: Tuple[int, int] = (1000, 600),
              frames: int = 20, warmup: int = 2, device: str = 'cpu', amp: Optional[str] = None,
              mode: str = 'offline', ref_cache: bool = True, checkpoint: Optional[str] = None,
              model: Optional[torch.nn.Module] = None, video: Optional[FrameSource] = None, seed: int = 0,
              video_length: Optional[int] = None, fast: bool = True) -> BenchmarkResult:
    """Runs ``method`` over the first ``warmup + frames`` frames of a video and measures it.

    Args:
        method, backbone: names of a method and a backbone (ignored when ``model`` is given).
        size: (width, height) of the synthetic frames in pixels; also the resize limits of the
            preprocessing, so the network sees exactly this size (padded to multiples of 16).
        frames: timed frames (>= 1). warmup: untimed frames before them (>= 0).
        device: ``cpu``, ``cuda`` or ``auto``.
        amp: None (fp32), ``bf16`` or ``fp16`` (autocast; detections then differ from MMTracking's).
        mode: ``offline`` or ``online`` (see :mod:`viddet.engine.video`).
        ref_cache: SELSA/TRoI reference cache (False recomputes the references every frame, as
            MMTracking does).
        checkpoint: optional weights (path, URL or model-zoo name).
        model: an already built method (then method/backbone/checkpoint/ref_cache/fast are not
            used to build one, only reported).
        video: optional :class:`viddet.data.frames.FrameSource` (default: :class:`SyntheticVideo`).
        video_length: frames in the synthetic video (>= warmup + frames). Default: warmup + frames,
            plus the method's read-ahead (``read_ahead``: FGFA's 15 offline), so that with ``warmup >= 15`` every timed FGFA
            frame has its full 31-frame window (near the video's ends the window repeats the end
            frames and FGFA runs fewer FlowNet passes).
        fast: the fast modules of :mod:`viddet.speedups` (False: the plain modules).

    Returns:
        a :class:`BenchmarkResult`; its record says which CPU kernels ran (``cpu_kernels``: the
        :class:`viddet.runtime.CpuKernels` of the fast modules, None for the plain modules).

    Raises:
        VidDetError: bad arguments (sizes, counts, device, AMP type, checkpoint).
    """
    if frames < 1 or warmup < 0:
        raise VidDetError(f'--frames must be >= 1 and --warmup >= 0, got {frames} and {warmup}')
    if amp is not None and amp not in AMP_DTYPES:
        raise VidDetError(f'--amp {amp!r}: choose one of {", ".join(AMP_DTYPES)}')
    if mode not in MODES:
        raise VidDetError(f'--mode {mode!r}: choose one of {", ".join(MODES)}')
    dev = resolve_device(device)
    if model is None:   # ref_cache for the methods that have it (SELSA, TRoI)
        settings = {'ref_cache': ref_cache} if 'ref_cache' in method_class(method).Settings.names() else {}
        model = build_model(method, backbone, checkpoint, seed, fast=fast, **settings)
    model = model.to(dev).eval()
    width, height = size
    total = warmup + frames
    if video_length is None:
        video_length = total + model.read_ahead(mode)
    if video_length < total:
        raise VidDetError(f'video length {video_length} < warm-up + timed frames ({total})')
    source = video if video is not None else SyntheticVideo(width, height, video_length, seed=seed)
    autocast = torch.autocast(dev.type, dtype=AMP_DTYPES[amp]) if amp else nullcontext()
    with autocast:
        lat, warm, stages, mem, mem_frames = _timed_run(model, source, dev, mode, size, warmup, frames)
    kernels = speedups.kernels_of(model)
    has_cache = 'ref_cache' in model.Settings.names()
    extra = {'mode': mode, 'amp': amp or 'fp32', 'ref_cache': bool(model.ref_cache) if has_cache else None,
             'weights': checkpoint or f'random (seed {seed})', 'fast_paths': speedups.is_converted(model),
             'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, 'cpu_count': os.cpu_count(),
             'cpu_kernels': None if kernels is None else kernels.as_dict(), 'video_length': source.length,
             'memory_baseline_mb': None if mem.baseline_mb is None else round(mem.baseline_mb, 3)}
    return BenchmarkResult(model.name, backbone, str(dev), (width, height), len(lat), len(warm),
                           lat, warm, stages, mem.peak_mb, mem.kind, mem_frames, extra)


def _timed_run(model, source: FrameSource, dev: torch.device, mode: str, size: Tuple[int, int], warmup: int,
               frames: int):
    """Runs ``model`` over ``source`` until ``frames`` frames after ``warmup`` are timed (module
    docstring). Returns (timed latencies ms, warm-up latencies ms, mean ms per timed frame in each
    stage and ``other``, the :class:`PeakMemory`, memory after each frame)."""
    timer = StageTimer(True, dev)
    lat, warm, mem_frames = [], [], []
    stage_sum: Dict[str, float] = {k: 0.0 for k in STAGES}
    mem = PeakMemory(dev)
    with mem:
        results = run_video(model, source, mode=mode, device=dev, scale=(max(size), min(size)), timer=timer)
        seconds = lambda: getattr(source, 'seconds', 0.0)  # noqa: E731
        t_prev, src_prev = time.perf_counter(), seconds()
        for res in results:
            if dev.type == 'cuda':
                torch.cuda.synchronize(dev)
            now, src_now = time.perf_counter(), seconds()
            ms = ((now - t_prev) - (src_now - src_prev)) * 1000.0
            if res.frame.index < warmup:
                warm.append(ms)
            else:
                lat.append(ms)
                for k, v in res.stages.items():
                    stage_sum[k] = stage_sum.get(k, 0.0) + v * 1000.0
            mem_frames.append(mem.current_mb())
            if len(lat) == frames:
                results.close()  # the rest of the video (FGFA's look-ahead) is not run
                break
            t_prev, src_prev = time.perf_counter(), seconds()
    if len(lat) < 1:
        raise VidDetError(f'the video ended after {len(warm)} frames, before any timed frame')
    stages = {k: v / len(lat) for k, v in stage_sum.items() if v > 0}
    stages['other'] = max(0.0, float(np.mean(lat)) - sum(stages.values()))
    return lat, warm, stages, mem, mem_frames


def run_cli(args) -> int:
    """``viddet benchmark`` entry point (arguments from :func:`viddet.cli.add_benchmark_parser`)."""
    set_threads(args.threads)
    options = dict(method=args.method, backbone=args.backbone, size=parse_size(args.size), frames=args.frames,
                   warmup=args.warmup, device=args.device, amp=args.amp, mode=args.mode,
                   ref_cache=not args.no_ref_cache, seed=args.seed, fast=not args.plain)
    result = benchmark(checkpoint=args.checkpoint, **options)
    print(('ONNX Runtime, ' if is_export(args.checkpoint) else '') + result.summary())
    if is_export(args.checkpoint):   # ONNX Runtime vs PyTorch (the export's source weights), side by side
        source = read_manifest(Path(args.checkpoint))['source'].get('checkpoint')
        pytorch = benchmark(checkpoint=source if source and Path(source).is_file() else None, **options)
        print('PyTorch, ' + pytorch.summary())
        print(f'seconds per frame (median): ONNX Runtime {result.latency_ms_median / 1000:.3f}, '
              f'PyTorch {pytorch.latency_ms_median / 1000:.3f}')
    if args.json:
        atomic_write_json(args.json, result.as_dict(), indent=1)
        print(f'  wrote {args.json}')
    return 0


__all__ = ['SyntheticVideo', 'PeakMemory', 'BenchmarkResult', 'benchmark', 'build_model',
           'parse_size', 'run_cli']
