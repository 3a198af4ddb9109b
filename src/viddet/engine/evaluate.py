"""Inference over a whole annotated data set: what ``viddet test`` and the evaluation during
training both run, one video at a time with the video engine (offline = MMTracking's test protocol
by default), then scored with :func:`viddet.evaluation.report.evaluate_and_report`.

Nothing is lost when a run stops part-way: every video's detections are saved as soon as the video
is done (``<out_dir>/videos/<n>.json``), and ``resume=True`` (``viddet test --resume``) skips the
videos already saved. The complete result, ``<out_dir>/results.json`` (a COCO results file,
re-scorable with ``viddet eval``), is written only when every video is in; ``<out_dir>/run.json``
records what produced it (checkpoint and its SHA-256, method, inference settings, the CPU kernels of
the fast paths), and a resumed run must match it (the kernels aside: they change only float
rounding), so that one ``results.json`` never mixes two models' or two settings' detections.
``viddet test`` holds the folder's lock (:mod:`viddet.locks`) while it runs: a second run into the
same ``--out-dir`` is refused. A write that fails (a full disk) stops the run with one line naming
the file, the reason and what is kept; Ctrl-C and SIGTERM stop it the same way
(:class:`viddet.interrupts.Interrupted`, exit status 130 / 143).

Under ``torchrun`` the videos are sharded over the ranks (longest first, balanced by frame count);
every rank saves its own videos and rank 0 merges them.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from viddet import speedups
from viddet.data.image_sources import ImageListSource
from viddet.data.output_paths import os_error_reason
from viddet.errors import VidDetError
from viddet.fileio import atomic_write_json, read_json, sha256_file
from viddet.interrupts import Interrupted, handle_interrupts, signal_of
from viddet.linking.link import LINK_MODES, link_video
from viddet.locks import output_lock
from viddet.runtime import init_distributed
from viddet.version import __version__

Video = Tuple[str, List[dict]]
"""(video name, image dicts of its frames sorted by ``frame_id``)."""


def load_videos(ann_file) -> Tuple[List[Video], List[dict]]:
    """Reads a COCO-VID annotation file.

    Returns:
        (videos, categories): videos in file order, images without a ``video_id`` (DET-style) as
        one-frame videos; categories: the JSON list.

    Raises:
        VidDetError: unreadable JSON or no ``images`` list.
    """
    data = read_json(ann_file, 'annotation file')
    if not isinstance(data, dict) or not isinstance(data.get('images'), list):
        raise VidDetError(f'{ann_file}: not a COCO-VID annotation file (no "images" list)')
    names = {v['id']: v.get('name', str(v['id'])) for v in data.get('videos', []) if isinstance(v, dict)}
    groups: Dict[object, List[dict]] = defaultdict(list)
    for img in data['images']:
        if not isinstance(img, dict) or 'id' not in img or 'file_name' not in img:
            raise VidDetError(f'{ann_file}: an image entry without "id" or "file_name": {str(img)[:80]}')
        vid = img.get('video_id')
        groups[vid if vid is not None else ('image', img['id'])].append(img)
    videos = []
    for key, imgs in groups.items():
        imgs.sort(key=lambda im: im.get('frame_id', 0))
        videos.append((names.get(key, str(key)), imgs))
    return videos, data.get('categories', [])


def shard(videos: Sequence[Video], rank: int, world: int) -> List[int]:
    """The indices of the videos rank ``rank`` runs: longest first to the least-loaded rank
    (deterministic, every video exactly once over the ranks)."""
    loads = [0] * world
    mine = []
    for i in sorted(range(len(videos)), key=lambda i: (-len(videos[i][1]), i)):
        r = min(range(world), key=lambda k: (loads[k], k))
        loads[r] += len(videos[i][1])
        if r == rank:
            mine.append(i)
    return sorted(mine)


def label_to_category(class_names: Sequence[str], categories: Sequence[dict], ann_file='') -> List[Optional[int]]:
    """Model label -> JSON category id, matched by name (or by ImageNet synset, ``encode_name``);
    None for a model class the annotation file does not have (its detections are not scored), e.g.
    a 30-class ImageNet VID model on a data set of 5 of those classes.

    Raises:
        VidDetError: no model class matches any category of the file.
    """
    by_name = {}
    for c in categories:
        if isinstance(c, dict) and 'id' in c:
            for key in ('name', 'encode_name'):
                if c.get(key) is not None:
                    by_name.setdefault(c[key], c['id'])
    ids = [by_name.get(n) for n in class_names]
    if categories and not any(i is not None for i in ids):
        raise VidDetError(f'{ann_file}: none of the model\'s classes ({", ".join(class_names[:5])}, ...) is a '
                          f'category of the annotation file ({", ".join(str(c.get("name")) for c in categories[:5])}, ...)')
    if not categories:   # a file without categories: labels are numbered from 1, as MMTracking does
        ids = list(range(1, len(class_names) + 1))
    return ids


def subset_annotations(ann_file, image_ids, out_path) -> Path:
    """Writes the part of a COCO-VID file covering ``image_ids`` (their videos, images and
    annotations), so that a partial run (``--max-videos``) is scored on what it saw."""
    data = read_json(ann_file, 'annotation file')
    keep = set(image_ids)
    images = [im for im in data['images'] if im['id'] in keep]
    vids = {im.get('video_id') for im in images}
    data['images'] = images
    data['videos'] = [v for v in data.get('videos', []) if v['id'] in vids]
    data['annotations'] = [a for a in data.get('annotations', []) if a['image_id'] in keep]
    return atomic_write_json(out_path, data)


def check_frames(videos: Sequence[Video], img_root) -> None:
    """Checks that every frame file exists and is readable before hours of inference start.

    Raises:
        VidDetError: naming the first missing or unreadable file, its video and how many are missing.
    """
    root = Path(img_root)
    if not root.is_dir():
        raise VidDetError(f'--root {img_root}: folder not found')
    missing, unreadable = [], []
    for name, imgs in videos:
        for im in imgs:
            f = root / im['file_name']
            if not f.is_file():
                missing.append((name, f))
            elif not os.access(f, os.R_OK):
                unreadable.append((name, f))
    if missing:
        name, f = missing[0]
        raise VidDetError(f'video {name}: frame file {f} does not exist ({len(missing)} frame file(s) missing '
                          f'in all; is --root right?)')
    if unreadable:
        name, f = unreadable[0]
        raise VidDetError(f'video {name}: frame file {f} is not readable ({len(unreadable)} in all)')


def file_sha256(path) -> Optional[str]:
    """The SHA-256 (hex) of a file; None for None (random weights) or a path that is not a file."""
    if path is None or not Path(path).is_file():
        return None
    return sha256_file(path)


def _run_record(detector, ann_file, mode: str, link: str = 'none') -> dict:
    kernels = speedups.kernels_of(detector.model)   # None: the plain modules ran
    checkpoint = getattr(detector, 'checkpoint', None)
    return {'method': detector.method, 'mode': mode, 'link': link, 'scale': list(detector.scale),
            'test': detector.test.values(), 'annotations': str(Path(ann_file).resolve()),
            'classes': list(detector.class_names), 'checkpoint': checkpoint,
            'checkpoint_sha256': file_sha256(checkpoint),
            'cpu_kernels': None if kernels is None else kernels.as_dict()}


RECORD_KEYS = ('method', 'mode', 'link', 'scale', 'test', 'annotations', 'classes', 'checkpoint_sha256')
"""What a resumed test run must share with the run that began it (``run.json``): the model (the
checkpoint's SHA-256, not its path: a file moved is the same model, a file replaced is not), its
inference settings and the data."""


def check_out_dir(out_dir, resume: bool = False) -> None:
    """Checks a test run's output folder before any work (``viddet test`` calls it before loading
    the model): a folder that can be created and written, holding no other run unless ``resume``.

    Raises:
        VidDetError: a file where the folder should be, a folder that cannot be created or written,
            a complete earlier result or an unfinished run without ``resume``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise VidDetError(f'--out-dir {out_dir} is a file, not a folder')
    try:
        (out_dir / 'videos').mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VidDetError(f'--out-dir {out_dir}: cannot create it ({e.strerror})') from None
    if not os.access(out_dir / 'videos', os.W_OK):
        raise VidDetError(f'--out-dir {out_dir}: not writable')
    if resume:
        return
    done = out_dir / 'results.json'
    if done.exists():
        raise VidDetError(f'{out_dir} already holds a complete test run ({done}): give another --out-dir '
                          f'(or --resume to score it again without running anything)')
    if any((out_dir / 'videos').glob('*.json')):
        raise VidDetError(f'{out_dir} holds the saved videos of an unfinished test run: continue it with '
                          f'--resume, or give another --out-dir')


def _prepare_out_dir(out_dir: Path, record: dict, resume: bool, rank: int) -> None:
    """:func:`check_out_dir`, then (resume) the earlier run's record must match this run's."""
    check_out_dir(out_dir, resume)
    run_file = out_dir / 'run.json'
    if resume and run_file.exists():
        old = read_json(run_file, 'test run record')
        keys = RECORD_KEYS if 'checkpoint_sha256' in old else RECORD_KEYS[:-1] + ('checkpoint',)   # older run.json
        diff = [k for k in keys if old.get(k) != record.get(k)]
        if diff:
            was = {k: old.get(k) for k in diff}
            now = {k: record.get(k) for k in diff}
            if 'checkpoint_sha256' in diff:
                was['checkpoint'], now['checkpoint'] = old.get('checkpoint'), record.get('checkpoint')
            raise VidDetError(f'--resume: {out_dir} was made with other settings ({", ".join(diff)} differ: '
                              f'{was} there vs {now} now); resuming would mix their detections in one '
                              f'results.json: run it with the settings of {run_file}, or give another --out-dir')
    if rank == 0:
        atomic_write_json(run_file, {**record, 'viddet_version': __version__}, indent=1)


def run_test(detector, ann_file, img_root, out_dir, mode: str = 'offline', max_videos: Optional[int] = None,
             progress: bool = True, resume: bool = False, link: str = 'none') -> Optional[List[dict]]:
    """Detections for every frame of ``ann_file``, as COCO results (rank 0; other ranks get None).

    With ``max_videos``, ``<out_dir>/annotations_subset.json`` holds the annotations of the videos
    that were run (score against it, not the whole file).

    Args:
        detector: a :class:`viddet.api.VideoDetector`.
        ann_file: COCO-VID JSON (``file_name`` relative to ``img_root``).
        img_root: folder the ``file_name`` paths are relative to (ImageNet VID: ``Data/VID``).
        out_dir: ``videos/<n>.json`` per finished video, ``results.json`` when all are done.
        mode: ``offline`` (MMTracking's test protocol) or ``online``.
        max_videos: only the first N videos (smoke tests), N >= 1.
        progress: a progress bar (frames of all ranks) on rank 0.
        resume: skip the videos an earlier run with the same settings saved in ``out_dir``.
        link: ``none``, ``online`` or ``seqnms``: each video's detections are linked
            (:func:`viddet.linking.link.link_video`) when the video is done, and saved and scored linked,
            with a ``track_id`` per result; recorded in ``run.json``.

    Raises:
        VidDetError: an unknown link mode, a bad annotation file, missing or unreadable frame files
            (checked first), an output folder that cannot be written or holds another run, a frame that
            cannot be decoded or a video shorter than its annotations (naming what was saved).
    """
    if max_videos is not None and max_videos < 1:
        raise VidDetError(f'--max-videos must be >= 1, got {max_videos}')
    if link not in LINK_MODES:
        raise VidDetError(f'unknown link mode {link!r}; expected one of {", ".join(LINK_MODES)}')
    videos, categories = load_videos(ann_file)
    if not videos:
        raise VidDetError(f'{ann_file} has no images')
    if max_videos is not None:
        videos = videos[:max_videos]
    out_dir = Path(out_dir)
    if detector.device.type == 'cuda':   # NCCL runs each rank's collectives on its current GPU
        import torch
        torch.cuda.set_device(detector.device)
    dist, rank, world = init_distributed(detector.device)
    lock = output_lock(out_dir, f'--out-dir {out_dir}', is_dir=True) if rank == 0 else contextlib.nullcontext()
    with handle_interrupts(), lock:   # SIGTERM as Ctrl-C; one run per output folder
        _prepare_out_dir(out_dir, _run_record(detector, ann_file, mode, link), resume, rank)
        if dist is not None:   # every rank has checked the folder before any saves a video into it
            dist.barrier()
        if max_videos is not None and rank == 0:
            subset_annotations(ann_file, [im['id'] for _, imgs in videos for im in imgs],
                               out_dir / 'annotations_subset.json')
        return _run_videos(detector, videos, categories, ann_file, img_root, out_dir, mode, link, progress, resume,
                           dist, rank, world)


def _run_videos(detector, videos: List[Video], categories, ann_file, img_root, out_dir: Path, mode: str, link: str,
                progress: bool, resume: bool, dist, rank: int, world: int) -> Optional[List[dict]]:
    """The part of :func:`run_test` after the output folder is ready: this rank's videos, each saved
    when done, then (rank 0) every rank's merged into ``results.json``."""
    from tqdm import tqdm

    mine = shard(videos, rank, world)
    check_frames([videos[i] for i in mine], img_root)
    cat_ids = label_to_category(detector.class_names, categories, ann_file)
    part = lambda i: out_dir / 'videos' / f'{i:06d}.json'  # noqa: E731
    todo = [i for i in mine if not (resume and _saved_video(part(i), videos[i]))]
    if resume and rank == 0:
        print(f'resuming the test run in {out_dir}: {len(mine) - len(todo)} of {len(mine)} video(s) '
              f'already done' + ('; nothing left to run' if not todo else ''))
    total = sum(len(v[1]) for v in videos)
    bar = tqdm(total=total, unit='frame', desc=f'testing {detector.method}', disable=not progress or rank != 0,
               dynamic_ncols=True, initial=sum(len(videos[i][1]) for i in mine if i not in todo) * world)
    frames = _FrameProgress(bar, out_dir, world, rank)
    try:
        for i in todo:
            name, imgs = videos[i]
            results = _test_video(detector, name, imgs, img_root, mode, link, cat_ids, frames)
            atomic_write_json(part(i), {'video': name, 'frames': len(imgs), 'results': results})
    except (VidDetError, OSError, KeyboardInterrupt) as e:
        bar.close()
        saved = sum(1 for j in mine if part(j).exists())
        kept = (f'{saved} finished video(s) of this run are saved in {out_dir / "videos"}; '
                f'run the same command with --resume to continue')
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(signal_of(e), f'interrupted\n  {kept}') from None
        raise VidDetError(f'{write_failure(e) if isinstance(e, OSError) else e}\n  {kept}') from None
    if dist is not None:
        frames.report()
        dist.barrier()
    bar.close()
    if rank != 0:
        return None
    merged = [r for i in range(len(videos)) for r in read_json(part(i), 'saved video detections')['results']]
    try:
        atomic_write_json(out_dir / 'results.json', merged)
    except OSError as e:
        raise VidDetError(f'{write_failure(e, out_dir / "results.json")}\n  the detections of all {len(videos)} '
                          f'video(s) are kept in {out_dir / "videos"}: free space and run the same command with '
                          f'--resume (nothing is run again)') from None
    return merged


def write_failure(e: OSError, path=None) -> str:
    """``"cannot write <file>: <reason>"`` for an OSError of a write (its ``filename``, else ``path``)."""
    return f'cannot write {e.filename or path or "a file"}: {os_error_reason(e)}'


def _test_video(detector, name: str, imgs: List[dict], img_root, mode: str, link: str,
                cat_ids: Sequence[int], frames: '_FrameProgress') -> List[dict]:
    """The COCO results of one video (its images ``imgs``, frames read from ``img_root``), linked
    with ``link``; ``frames`` counts each frame as it is done."""
    dets = []
    source = ImageListSource([Path(img_root) / im['file_name'] for im in imgs], path=name)
    try:
        for result, im in zip(detector.predict(source, mode=mode, strict_length=True), imgs):
            dets.append(result.detections)
            frames.tick()
    finally:
        source.close()
    return [r for d, im in zip(link_video(dets, link, where=f'video {name}'), imgs)
            for r in coco_results(d, im['id'], cat_ids)]


class _FrameProgress:
    """The frames this rank has done, shown in the progress bar: directly in a single process,
    else every 2 s through a file per rank that rank 0 sums (:func:`_report_progress`)."""

    def __init__(self, bar, out_dir: Path, world: int, rank: int):
        self.bar, self.out_dir, self.world, self.rank = bar, out_dir, world, rank
        self.file = out_dir / 'videos' / f'.progress{rank}'
        self.last_poll, self.done = 0.0, 0

    def tick(self) -> None:
        self.done += 1
        if self.world == 1:
            self.bar.update(1)
        elif time.monotonic() - self.last_poll > 2:
            self.last_poll = time.monotonic()
            self.report()

    def report(self) -> None:
        _report_progress(self.file, self.done, self.bar, self.out_dir, self.world, self.rank)


def coco_results(detections, image_id: int, cat_ids: Sequence[int]) -> List[dict]:
    """One frame's :class:`viddet.structures.Detections` as COCO results entries (``bbox`` [x, y, w, h]
    in original pixels; ``track_id`` too when the detections are linked); labels whose category id
    is None (not in the data set) are left out."""
    out = []
    tracks = [None] * len(detections) if detections.track_ids is None else detections.track_ids.tolist()
    for (x1, y1, x2, y2), s, lab, t in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                           detections.labels.tolist(), tracks):
        if cat_ids[lab] is not None:
            out.append({'image_id': image_id, 'category_id': cat_ids[lab], 'bbox': [x1, y1, x2 - x1, y2 - y1],
                        'score': s, **({} if t is None else {'track_id': t})})
    return out


def _saved_video(path: Path, video: Video) -> bool:
    """Whether ``path`` holds the complete saved detections of ``video`` (a readable file of the
    same video and frame count)."""
    if not path.is_file():
        return False
    try:
        data = read_json(path, 'saved video detections')
    except VidDetError:
        return False
    return isinstance(data, dict) and data.get('video') == video[0] and data.get('frames') == len(video[1])


def _report_progress(progress_file: Path, done: int, bar, out_dir: Path, world: int, rank: int) -> None:
    """Multi-process progress: each rank writes its frame count, rank 0 sums them into its bar."""
    progress_file.write_text(str(done))
    if rank == 0:
        count = 0
        for r in range(world):
            try:
                count += int((out_dir / 'videos' / f'.progress{r}').read_text() or 0)
            except (OSError, ValueError):
                pass
        bar.update(max(0, count - bar.n))
