"""``viddet demo``: a video (file, frame folder or stream) in, an annotated MP4 and JSON lines out.

What happens to the outputs:

* Every output is checked before the model is loaded (:func:`viddet.data.output_paths.check_outputs`):
  its folder exists and accepts new files, it is not a folder, and it is neither an input (the
  video file, a frame of the folder) nor the other output.
* Both writers work under partial names (``<out>.partial.mp4``, ``<json>.partial.jsonl``) and
  rename onto the final names only when every frame is in, each on its own: a failure to finish one
  never removes the other. An earlier complete result under the final name is replaced only by a
  complete one.
* When the run stops early (a corrupt frame, a full disk, Ctrl-C, a bug), the frames finished so far
  are kept under the partial names (the MP4 finished so that it plays) and the message says which
  files hold how many frames. SIGTERM is handled as Ctrl-C (:mod:`viddet.interrupts`): status 130
  (Ctrl-C) or 143 (SIGTERM); bad input exits with 2.
* Each output is locked while the demo runs (``<out>.lock`` beside it, :mod:`viddet.locks`): a second
  demo writing the same files is refused, naming the first.
* A video that ends before the frame count its container announced is reported with both numbers,
  as it happens and in the final message.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

from viddet.errors import VidDetError
from viddet.interrupts import signal_of


def default_outputs(input_spec: str, method: str, out: Optional[str], json_path: Optional[str]):
    """Output paths: ``--out`` / ``--json`` if given, else ``<input name>_<method>.mp4/.jsonl`` in
    the current folder (the JSON beside the video when only ``--out`` is given)."""
    stem = Path(input_spec.rstrip('/')).stem or 'stream'
    video = Path(out) if out else Path(f'{stem}_{method}.mp4')
    json_file = Path(json_path) if json_path else video.with_suffix('.jsonl')
    return video, json_file


def plural(n: int, word: str = 'frame') -> str:
    """``"1 frame"``, ``"2 frames"``."""
    return f'{n} {word}{"" if n == 1 else "s"}'


def check_demo_args(args) -> None:
    """The numeric options, checked before anything is opened.

    Raises:
        VidDetError: ``--max-frames`` < 1, ``--fps`` not a positive number, ``--score-thr`` not in [0, 1].
    """
    if args.max_frames is not None and args.max_frames < 1:
        raise VidDetError(f'--max-frames must be at least 1, got {args.max_frames}')
    if args.fps is not None and not (args.fps > 0 and math.isfinite(args.fps)):
        raise VidDetError(f'--fps must be a positive number, got {args.fps:g}')   # 0 would mean "the input's"
    if not 0.0 <= args.score_thr <= 1.0:   # NaN fails too
        raise VidDetError(f'--score-thr must be in [0, 1], got {args.score_thr:g}')


def input_files(spec: str) -> List[Path]:
    """The files a demo run reads and must not overwrite: the video file, every frame of a folder
    (not only the first ``--max-frames``), or the device file of a camera."""
    from viddet.data.image_sources import IMAGE_SUFFIXES
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [path] if path.exists() else []


def _method_hint(args) -> Optional[str]:
    """The method the outputs' default names will carry, when it is known before loading the model."""
    from viddet.checkpoints.zoo import MODEL_ZOO
    if args.method or args.random_weights or args.checkpoint is None:
        return args.method or 'selsa'
    if args.checkpoint in MODEL_ZOO:
        return args.checkpoint.split('_')[0]
    return None


def _outputs(args, method: str, inputs: List[Path], locks: contextlib.ExitStack) -> Tuple[Path, Path]:
    """The checked output paths, each locked (``<out>.lock``: a second demo writing the same files is
    refused); ``locks`` holds the locks (those of earlier paths are released)."""
    from viddet.data.output_paths import check_outputs
    from viddet.locks import output_lock
    video, json_file = default_outputs(args.input, method, args.out, args.json)
    check_outputs([('--out', video), ('--json', json_file)], inputs)
    locks.close()
    for label, path in (('--out', video), ('--json', json_file)):
        locks.enter_context(output_lock(path, f'{label} {path}', is_dir=False))
    return video, json_file


def _finish(writers, complete: bool) -> List[str]:
    """Closes (``complete``) or aborts each writer on its own; returns the failures' messages."""
    problems = []
    for w in writers:
        try:
            w.close() if complete else w.abort()
        except VidDetError as e:
            problems.append(str(e))
    return problems


def _kept(writers) -> str:
    return ', '.join(f'{w.kept} ({plural(w.frames_written)})' for w in writers if w.kept) or 'nothing'


def run_demo(args) -> int:
    """Runs the demo for parsed CLI ``args``; returns the exit status (module docstring).

    Raises:
        VidDetError: bad input, checkpoint or output path, or a failure during the run (the CLI
            prints the message, which says what was kept).
        KeyboardInterrupt: after the partial results were kept and reported (the CLI exits 130).
    """
    from viddet.data.sources import open_source
    check_demo_args(args)
    source = open_source(args.input, max_frames=args.max_frames)
    try:
        with contextlib.ExitStack() as locks:
            return _run(args, source, locks)
    finally:
        source.close()


def _run(args, source, locks: contextlib.ExitStack) -> int:
    from tqdm import tqdm

    from viddet import speedups
    from viddet.api import detector_from_args
    from viddet.data.writers import JsonLinesWriter, VideoWriter
    from viddet.engine.video import TruncatedVideoWarning
    from viddet.visualize import draw_detections

    link = args.link
    if link == 'seqnms' and source.is_live:
        raise VidDetError(f'--link seqnms links the whole video before it writes a frame, and {args.input} is a '
                          f'live stream: use --link online')
    inputs = input_files(args.input)
    hint = _method_hint(args)
    video_path, json_path = _outputs(args, hint or 'selsa', inputs, locks)   # all checks before the model loads
    if args.random_weights:
        print('viddet demo: WARNING: --random-weights: the model is randomly initialised; '
              'the detections are meaningless (pipeline check only)', file=sys.stderr)
    detector = detector_from_args(args)
    if detector.method != (hint or 'selsa'):   # a checkpoint file without --method: its method names them
        video_path, json_path = _outputs(args, detector.method, inputs, locks)
    mode = args.mode or ('online' if source.is_live else 'offline')
    fps = args.fps if args.fps is not None else (source.fps or 25.0)
    linking = '' if link == 'none' else f', linking {link}'
    print(f'viddet demo: {detector.method} on {args.input} '
          f'({plural(source.length) if source.length is not None else "? frames"}, {mode} mode{linking}, '
          f'{detector.device})', file=sys.stderr)
    print(f'viddet demo: {speedups.describe(detector.model)}', file=sys.stderr)
    writers = [VideoWriter(video_path, fps=fps), JsonLinesWriter(json_path, detector.class_names)]
    video, records = writers
    done, tracks, shown, t0 = 0, set(), set(), time.perf_counter()
    bar = tqdm(total=source.length, unit='frame', desc='detecting', dynamic_ncols=True)
    failure = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', TruncatedVideoWarning)
        try:
            for result in detector.predict(source, mode=mode, link=link, on_detected=lambda r: bar.update(1)):
                frame, det = result.frame, result.detections
                records.write(frame.index, frame.name, det)
                video.write(draw_detections(frame.image, det, detector.class_names, args.score_thr))
                done += 1
                if det.track_ids is not None:
                    ids, scores = det.track_ids.tolist(), det.scores.tolist()
                    tracks.update(t for t in ids if t >= 0)
                    shown.update(t for t, sc in zip(ids, scores) if t >= 0 and sc >= args.score_thr)
        except BaseException as e:   # handled below, once the warnings are shown normally again
            failure = e
    bar.close()
    notes = _warnings(caught, TruncatedVideoWarning)
    if failure is not None:
        _stopped(failure, writers, done, link, notes)
    if done == 0:
        _finish(writers, complete=False)
        raise VidDetError(f'{args.input} gave no frames')
    problems = _finish(writers, complete=True)
    if problems:
        raise VidDetError('; '.join(problems) + f'\n  kept: {_kept(writers)}')
    dt = time.perf_counter() - t0
    linked = '' if link == 'none' else (f'; linked with {link}: {plural(len(shown), "track")} drawn (a box '
                                        f'scoring >= {args.score_thr:g}), {len(tracks)} in all')
    print(f'viddet demo: {plural(done)} in {dt:.1f} s ({dt / done:.2f} s/frame){linked}; wrote {video_path} and '
          f'{json_path}' + ''.join(f'\n  WARNING: {n}' for n in notes), file=sys.stderr)
    return 0


def _stopped(failure: BaseException, writers, done: int, link: str, notes: List[str]):
    """Keeps the partial outputs of a run stopped by ``failure`` and raises: a VidDetError saying
    what was kept (``failure`` itself when nothing was), else ``failure`` after printing it."""
    _finish(writers, complete=False)
    if any(w.kept for w in writers):
        kept = f'kept the {plural(done)} finished before it: {_kept(writers)}'
    else:
        kept = 'nothing was written' + (' (--link seqnms writes once the whole video is detected)'
                                        if link == 'seqnms' else '')
    kept += ''.join(f'\n  WARNING: {n}' for n in notes)
    if isinstance(failure, VidDetError):
        if not any(w.kept for w in writers) and not notes and link != 'seqnms':
            raise failure
        raise VidDetError(f'{failure}\n  {kept}') from None
    why = signal.Signals(signal_of(failure)).name if isinstance(failure, KeyboardInterrupt) else type(failure).__name__
    print(f'viddet demo: stopped ({why}); {kept}', file=sys.stderr)
    raise failure


def _warnings(caught, category) -> List[str]:
    """The messages of the caught warnings of ``category`` (printed now); the others are shown
    as Python would have shown them."""
    notes = []
    for w in caught:
        if issubclass(w.category, category):
            notes.append(str(w.message))
            print(f'viddet demo: WARNING: {w.message}', file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    caught.clear()
    return notes
