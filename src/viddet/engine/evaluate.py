"""``viddet test``: run a VID method over every video of a COCO-VID annotation file and score it.

Videos are processed one by one with the video engine (offline = MMTracking's test protocol by
default). Under ``torchrun`` the videos are sharded over the ranks (longest first, balanced by frame
count); every rank writes its detections to ``<out_dir>/parts/rank<r>.json`` and rank 0 gathers
them, shows one progress bar counting the frames of all ranks, saves the raw detections as a COCO
results file (``results.json``, re-scorable with ``viddet eval``) and reports COCO AP50 and the
official ImageNet VID mAP with slow / medium / fast (``viddet.evaluation.vid``).
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from viddet.errors import VidDetError
from viddet.fileio import atomic_write_json


def load_videos(ann_file) -> tuple:
    """Reads a COCO-VID annotation file.

    Returns:
        (videos, categories): videos is a list of (video name, [image dicts sorted by frame_id]);
        images without a ``video_id`` (DET-style) are one-frame videos. categories: the JSON list.

    Raises:
        VidDetError: unreadable JSON or missing ``images``.
    """
    try:
        data = json.loads(Path(ann_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VidDetError(f'cannot read annotation file {ann_file}: {e}') from None
    if not isinstance(data, dict) or 'images' not in data:
        raise VidDetError(f'{ann_file} is not a COCO-VID annotation file (no "images")')
    names = {v['id']: v.get('name', str(v['id'])) for v in data.get('videos', [])}
    groups: Dict[object, List[dict]] = defaultdict(list)
    for img in data['images']:
        vid = img.get('video_id')
        groups[vid if vid is not None else ('image', img['id'])].append(img)
    videos = []
    for key, imgs in groups.items():
        imgs.sort(key=lambda im: im.get('frame_id', 0))
        videos.append((names.get(key, str(key)), imgs))
    return videos, data.get('categories', [])


def shard(videos: Sequence, rank: int, world: int) -> List:
    """Assigns videos to ranks, longest first to the least-loaded rank (deterministic)."""
    loads = [0] * world
    mine = []
    for i in sorted(range(len(videos)), key=lambda i: (-len(videos[i][1]), i)):
        r = min(range(world), key=lambda k: (loads[k], k))
        loads[r] += len(videos[i][1])
        if r == rank:
            mine.append(videos[i])
    return mine


def label_to_category(class_names: Sequence[str], categories: Sequence[dict]) -> List[int]:
    """Model label -> JSON category id, by class name (falls back to label + 1)."""
    by_name = {c['name']: c['id'] for c in categories}
    return [by_name.get(n, i + 1) for i, n in enumerate(class_names)]


def _dist():
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def subset_annotations(ann_file, image_ids, out_path) -> Path:
    """Writes the part of a COCO-VID file covering ``image_ids`` (their videos, images and
    annotations), so that a partial run (``--max-videos``) is scored on what it saw."""
    data = json.loads(Path(ann_file).read_text())
    keep = set(image_ids)
    images = [im for im in data['images'] if im['id'] in keep]
    vids = {im.get('video_id') for im in images}
    data['images'] = images
    data['videos'] = [v for v in data.get('videos', []) if v['id'] in vids]
    data['annotations'] = [a for a in data.get('annotations', []) if a['image_id'] in keep]
    return atomic_write_json(out_path, data)


def run_test(detector, ann_file, img_root, out_dir, mode: str = 'offline', max_videos: Optional[int] = None,
             progress: bool = True) -> Optional[List[dict]]:
    """Detections for every frame of ``ann_file``, as COCO results (rank 0; other ranks get None).

    With ``max_videos``, ``<out_dir>/annotations_subset.json`` holds the annotations of the videos
    that were run (score against it, not the whole file).

    Args:
        detector: a :class:`viddet.api.VideoDetector`.
        ann_file: COCO-VID JSON (``file_name`` relative to ``img_root``).
        img_root: folder the ``file_name`` paths are relative to (ImageNet VID: ``Data/VID``).
        out_dir: where ``results.json`` (and the per-rank parts) are written.
        mode: ``offline`` (MMTracking's test protocol) or ``online``.
        max_videos: only the first N videos (smoke tests).

    Raises:
        VidDetError: missing frame files (names the file), bad annotation file.
    """
    from tqdm import tqdm

    from viddet.data.sources import ImageListSource
    videos, categories = load_videos(ann_file)
    out_dir = Path(out_dir)
    if max_videos is not None:
        videos = videos[:max_videos]
        subset_annotations(ann_file, [im['id'] for _, imgs in videos for im in imgs],
                           out_dir / 'annotations_subset.json')
    if not videos:
        raise VidDetError(f'{ann_file} has no images')
    parts = out_dir / 'parts'
    parts.mkdir(parents=True, exist_ok=True)
    dist, rank, world = _dist()
    mine = shard(videos, rank, world)
    cat_ids = label_to_category(detector.class_names, categories)
    total = sum(len(v[1]) for v in videos)
    bar = tqdm(total=total, unit='frame', desc=f'testing {detector.method}', disable=not progress or rank != 0,
               dynamic_ncols=True)
    results, done, last_poll = [], 0, 0.0

    def report_progress(force=False):
        nonlocal last_poll
        if world == 1:
            return
        now = time.monotonic()
        if not force and now - last_poll < 2:
            return
        last_poll = now
        (parts / f'progress{rank}').write_text(str(done))
        if rank == 0:
            count = 0
            for r in range(world):
                try:
                    count += int((parts / f'progress{r}').read_text() or 0)
                except (OSError, ValueError):
                    pass
            bar.update(count - bar.n)

    for name, imgs in mine:
        files = [Path(img_root) / im['file_name'] for im in imgs]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise VidDetError(f'video {name}: frame file {missing[0]} does not exist '
                              f'({len(missing)} of {len(files)} frames missing; is --root right?)')
        source = ImageListSource(files, path=name)
        for result, im in zip(detector.predict(source, mode=mode), imgs):
            d = result.detections
            xyxy = d.boxes.tolist()
            for (x1, y1, x2, y2), s, l in zip(xyxy, d.scores.tolist(), d.labels.tolist()):
                results.append({'image_id': im['id'], 'category_id': cat_ids[l],
                                'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': s})
            done += 1
            if world == 1:
                bar.update(1)
            else:
                report_progress()
        source.close()
    atomic_write_json(parts / f'rank{rank}.json', results)
    if dist is not None:
        report_progress(force=True)
        dist.barrier()
    bar.close()
    if rank != 0:
        return None
    merged = []
    for r in range(world):
        merged.extend(json.loads((parts / f'rank{r}.json').read_text()))
    atomic_write_json(out_dir / 'results.json', merged)
    return merged
