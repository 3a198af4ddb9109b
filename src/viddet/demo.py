"""``viddet demo``: a video (file, frame folder or stream) in, an annotated MP4 and JSON lines out."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from viddet.errors import VidDetError


def default_outputs(input_spec: str, method: str, out: Optional[str], json_path: Optional[str]):
    """Output paths: ``--out`` / ``--json`` if given, else ``<input name>_<method>.mp4/.jsonl`` in
    the current folder (the JSON beside the video when only ``--out`` is given)."""
    stem = Path(input_spec.rstrip('/')).stem or 'stream'
    video = Path(out) if out else Path(f'{stem}_{method}.mp4')
    json_file = Path(json_path) if json_path else video.with_suffix('.jsonl')
    return video, json_file


def _discard(video, records) -> None:
    """Removes both outputs of a run that finished no frame: the writers' abort() keeps the JSON
    lines in ``<json>.partial`` for post-mortems, which holds nothing here."""
    video.abort()
    records.abort()
    records.partial_path.unlink(missing_ok=True)


def run_demo(args) -> int:
    """Runs the demo for parsed CLI ``args``; returns the exit status.

    Raises:
        VidDetError: bad input, checkpoint or output path (the CLI prints the message).
    """
    from tqdm import tqdm

    from viddet.api import detector_from_args
    from viddet.data.sources import open_source
    from viddet.data.writers import JsonLinesWriter, VideoWriter
    from viddet.visualize import draw_detections

    # fail before any work
    if args.max_frames is not None and args.max_frames < 1:
        raise VidDetError(f'--max-frames must be at least 1, got {args.max_frames}')
    if args.fps is not None and not args.fps > 0:   # 0 would silently fall back to the input's rate
        raise VidDetError(f'--fps must be positive, got {args.fps:g}')
    for p in default_outputs(args.input, args.method or 'selsa', args.out, args.json):
        if not p.parent.exists():
            raise VidDetError(f'output folder {p.parent} does not exist (for {p})')
    source = open_source(args.input, max_frames=args.max_frames)
    if args.random_weights:
        print('viddet demo: WARNING: --random-weights: the model is randomly initialised; '
              'the detections are meaningless (pipeline check only)', file=sys.stderr)
    detector = detector_from_args(args)
    video_path, json_path = default_outputs(args.input, detector.method, args.out, args.json)
    mode = args.mode or ('online' if source.is_live else 'offline')
    fps = args.fps if args.fps is not None else (source.fps or 25.0)
    print(f'viddet demo: {detector.method} on {args.input} ({source.length or "?"} frames, '
          f'{mode} mode, {detector.device})', file=sys.stderr)
    video = VideoWriter(video_path, fps=fps)
    records = JsonLinesWriter(json_path, detector.class_names)
    done, t0 = 0, time.perf_counter()
    bar = tqdm(total=source.length, unit='frame', desc='detecting', dynamic_ncols=True)
    try:
        for result in detector.predict(source, mode=mode):
            frame = result.frame
            records.write(frame.index, frame.name, result.detections)
            video.write(draw_detections(frame.image, result.detections, detector.class_names, args.score_thr))
            done += 1
            bar.update(1)
    except (VidDetError, KeyboardInterrupt) as e:
        bar.close()
        source.close()
        if done == 0:
            _discard(video, records)
            raise
        video.close()
        records.close()
        what = 'interrupted' if isinstance(e, KeyboardInterrupt) else str(e)
        raise VidDetError(f'{what}\n  the outputs hold the {done} frames before it: {video_path}, {json_path}') from None
    except BaseException:   # a bug, not bad input: keep the JSON lines so far (<json>.partial)
        if done == 0:
            _discard(video, records)
        else:
            video.abort()
            records.abort()
        raise
    bar.close()
    source.close()
    if done == 0:
        _discard(video, records)
        raise VidDetError(f'{args.input} gave no frames')
    video.close()
    records.close()
    dt = time.perf_counter() - t0
    print(f'viddet demo: {done} frames in {dt:.1f} s ({dt / done:.2f} s/frame); wrote {video_path} and {json_path}',
          file=sys.stderr)
    return 0
