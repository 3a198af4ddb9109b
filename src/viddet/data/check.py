"""``viddet check-data``: validates a COCO-VID (or COCO) annotation file before training or evaluation.

It reports what would make MMTracking's loaders (and viddet's, which follow them) fail or silently
drop data: broken structure and references, duplicate ids, ``frame_id`` values that are not
0..n-1 per video (MMTracking 0.14's ``CocoVideoDataset.ref_img_sampling`` in
``mmtrack/datasets/coco_video_dataset.py`` uses ``frame_id`` as the position in the video's frame
list), boxes that ``CocoVideoDataset._parse_ann_info`` drops (no overlap with the image, w or h
under 1 pixel) or that the training transforms clip, and missing frame files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

from viddet.classes import VID_CLASSES
from viddet.fileio import read_json


@dataclass
class CheckReport:
    """Result of :func:`check_data`.

    Attributes:
        ann_file: the checked JSON.
        image_root: the folder the ``file_name`` paths were resolved against ('' if not checked).
        num_videos, num_images, num_annotations: counts found.
        errors: problems that make the file unusable or wrong (the CLI exits non-zero).
        warnings: suspicious but usable entries (e.g. boxes partly outside the image).
    """

    ann_file: str
    image_root: str = ''
    num_videos: int = 0
    num_images: int = 0
    num_annotations: int = 0
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    error_counts: Dict[str, int] = field(default_factory=dict)
    warning_counts: Dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no error was found."""
        return not self.error_counts

    def _add(self, kind: str, msg: str, error: bool, max_listed: int = 20):
        counts, msgs = (self.error_counts, self.errors) if error else (self.warning_counts, self.warnings)
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] <= max_listed:
            msgs.append(msg)

    def format(self) -> str:
        """Human-readable report."""
        lines = [f'{self.ann_file}: {self.num_videos} videos, {self.num_images} images, '
                 f'{self.num_annotations} annotations' +
                 (f' (frames under {self.image_root})' if self.image_root else '')]
        for title, counts, msgs in (('error', self.error_counts, self.errors),
                                    ('warning', self.warning_counts, self.warnings)):
            if counts:
                lines.append(f'{sum(counts.values())} {title}s: ' +
                             ', '.join(f'{k} {v}' for k, v in counts.items()))
                lines += [f'  {title}: {m}' for m in msgs]
                shown = len(msgs)
                if sum(counts.values()) > shown:
                    lines.append(f'  ... ({sum(counts.values()) - shown} more not listed)')
        lines.append('OK' if self.ok else 'PROBLEMS FOUND')
        return '\n'.join(lines)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _resolve_image_root(root: Path, images: List[dict]) -> Path:
    """``root`` itself, or ``root/Data/VID`` / ``root/Data/DET`` when the first frame with a
    well-formed ``file_name`` lives there (a malformed first record is reported on its own and does
    not send every other frame to the wrong folder)."""
    first = next((im['file_name'] for im in images if isinstance(im, dict) and isinstance(im.get('file_name'), str)),
                 None)
    if first is None:
        return root
    for cand in (root, root / 'Data' / 'VID', root / 'Data' / 'DET'):
        if (cand / first).exists():
            return cand
    return root


def check_data(ann_file, root=None, check_files: bool = True, known_classes: Iterable[str] = VID_CLASSES,
               max_listed: int = 20) -> CheckReport:
    """Validates a COCO-VID (or COCO) annotation file for training/evaluation with viddet.

    Checks: JSON syntax and top-level structure; duplicate image/annotation/video/category ids;
    annotations pointing at unknown images, videos or categories; categories whose name is not one
    of ``known_classes``; per video, ``frame_id`` values that are not exactly 0..n-1 (MMTracking
    indexes frames by ``frame_id``); bboxes that are not 4 finite numbers, have w <= 0 or h <= 0 or
    do not overlap the image (errors), or extend past the image or have w < 1 or h < 1 (warnings:
    the loader drops or clips them); ``area`` missing; image sizes that are not positive; and,
    with ``check_files``, frames missing under ``root`` (tried as ``root``, ``root/Data/VID``,
    ``root/Data/DET``).

    Args:
        ann_file: the JSON file.
        root: image folder the ``file_name`` paths are relative to (None: skip the file check).
        check_files: check that every frame file exists.
        known_classes: category names accepted without error.
        max_listed: at most this many messages are kept per problem kind (all are counted).

    Returns:
        :class:`CheckReport` (``report.ok`` False when errors were found).

    Raises:
        VidDetError: if ``ann_file`` does not exist, cannot be read or is not valid JSON (naming the
            file and the position of the syntax error).
    """
    ann_file = Path(ann_file)
    report = CheckReport(ann_file=str(ann_file))
    add = lambda kind, msg, error=True: report._add(kind, msg, error, max_listed)  # noqa: E731
    parts = _top_level(read_json(ann_file, 'annotation file'), add)
    if parts is None:
        return report
    videos, images, anns, cats = parts
    report.num_videos, report.num_images, report.num_annotations = len(videos or []), len(images), len(anns)
    cat_ids = _ids_of(cats, 'categories', add)
    known = set(known_classes)
    for c in cats:
        if isinstance(c, dict) and c.get('name') not in known:
            add('unknown category', f'category id {c.get("id")!r} name {c.get("name")!r} is not one of the '
                f'{len(known)} known classes', error=False)
    vid_ids = _ids_of(videos or [], 'videos', add)
    img_ids = _ids_of(images, 'images', add)
    _ids_of(anns, 'annotations', add)
    img_by_id = _check_images(images, vid_ids if videos is not None else None, add)
    for a in anns:
        if isinstance(a, dict):
            _check_annotation(a, img_by_id.get(a.get('image_id')), img_ids, cat_ids,
                              vid_ids if videos is not None else None, add)
    if root is not None and check_files:
        report.image_root = _check_files(root, images, add)
    return report


# The steps of check_data; ``add(kind, message, error=True)`` records a problem in the report.
def _top_level(data, add: Callable) -> Optional[tuple]:
    """(videos or None, images, annotations, categories) of a well-formed file, else None."""
    if not isinstance(data, dict):
        add('structure', f'top level is a {type(data).__name__}, expected an object with images/annotations/categories')
        return None
    missing = False
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data.get(key), list):
            add('structure', f'missing or non-list "{key}"')
            missing = True
    if missing:
        return None
    videos = data.get('videos', None)
    if videos is not None and not isinstance(videos, list):
        add('structure', '"videos" is not a list')
        videos = None
    return videos, data['images'], data['annotations'], data['categories']


def _ids_of(items: list, what: str, add: Callable) -> Dict[object, int]:
    """id -> index of the first item with it; reports items without an id and duplicate ids."""
    seen = {}
    for i, it in enumerate(items):
        if not isinstance(it, dict) or 'id' not in it:
            add('structure', f'{what}[{i}] is not an object with an "id"')
            continue
        if it['id'] in seen:
            add('duplicate id', f'{what} id {it["id"]!r} appears at index {seen[it["id"]]} and {i}')
        else:
            seen[it['id']] = i
    return seen


def _check_images(images: list, vid_ids: Optional[Dict[object, int]], add: Callable) -> dict:
    """Checks every image (file name, size and, when the file has videos (``vid_ids`` not None),
    its video and ``frame_id``, which must be 0..n-1 per video); returns image id -> first image."""
    img_by_id = {}
    frames_per_video: Dict[object, List[int]] = {}
    for im in images:
        if not isinstance(im, dict):
            continue
        img_by_id.setdefault(im.get('id'), im)
        if 'file_name' not in im:
            add('structure', f'image id {im.get("id")!r} has no file_name')
        elif not isinstance(im['file_name'], str):
            add('structure', f'image id {im.get("id")!r} has a file_name that is not a string: '
                             f'{str(im["file_name"])[:60]!r} ({type(im["file_name"]).__name__})')
        w, h = im.get('width'), im.get('height')
        if not (_is_number(w) and _is_number(h) and w > 0 and h > 0):
            add('bad image size', f'image id {im.get("id")!r} ({im.get("file_name")}) has width {w!r}, height {h!r}')
        if vid_ids is not None:
            if im.get('video_id') not in vid_ids:
                add('unknown video', f'image id {im.get("id")!r} has unknown video_id {im.get("video_id")!r}')
            elif not isinstance(im.get('frame_id'), int) or isinstance(im.get('frame_id'), bool):
                add('bad frame_id', f'image id {im.get("id")!r} has frame_id {im.get("frame_id")!r}')
            else:
                frames_per_video.setdefault(im['video_id'], []).append(im['frame_id'])
    for vid, fids in frames_per_video.items():
        if sorted(fids) != list(range(len(fids))):
            fs = sorted(fids)
            add('bad frame_id', f'video id {vid!r}: frame_ids are not 0..{len(fids) - 1} '
                f'(first {fs[:5]}, last {fs[-3:]})')
    return img_by_id


def _check_annotation(a: dict, im, img_ids, cat_ids, vid_ids, add: Callable) -> None:
    """Checks one annotation's references (image ``im`` or None, category, video when ``vid_ids`` is
    not None) and its box."""
    aid = a.get('id')
    if a.get('image_id') not in img_ids:
        add('unknown image', f'annotation id {aid!r} has unknown image_id {a.get("image_id")!r}')
    if a.get('category_id') not in cat_ids:
        add('unknown category', f'annotation id {aid!r} has category_id {a.get("category_id")!r} '
            'not in "categories"')
    if vid_ids is not None and 'video_id' in a and a['video_id'] not in vid_ids:
        add('unknown video', f'annotation id {aid!r} has unknown video_id {a["video_id"]!r}')
    if im is not None and 'video_id' in a and 'video_id' in im and a['video_id'] != im['video_id']:
        add('unknown video', f'annotation id {aid!r} has video_id {a["video_id"]!r} but its image is in '
            f'video {im["video_id"]!r}')
    box = a.get('bbox')
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) and math.isfinite(v) for v in box)):
        add('bad box', f'annotation id {aid!r}: bbox {box!r} is not 4 finite numbers [x, y, w, h]')
        return
    x, y, w, h = box
    where = f'annotation id {aid!r} (image {a.get("image_id")!r}'
    where += f', {im.get("file_name")})' if isinstance(im, dict) else ')'
    if w <= 0 or h <= 0:
        add('bad box', f'{where}: bbox {box} has non-positive width or height')
        return
    if not _is_number(a.get('area')):
        add('missing area', f'{where}: no numeric "area" (pycocotools needs it)', error=False)
    if w < 1 or h < 1:
        add('tiny box', f'{where}: bbox {box} is under 1 pixel wide or high (dropped when loading)', error=False)
    if isinstance(im, dict) and _is_number(im.get('width')) and _is_number(im.get('height')):
        iw = min(x + w, im['width']) - max(x, 0)
        ih = min(y + h, im['height']) - max(y, 0)
        if iw <= 0 or ih <= 0:
            add('bad box', f'{where}: bbox {box} lies outside the {im["width"]}x{im["height"]} image')
        elif x < 0 or y < 0 or x + w > im['width'] or y + h > im['height']:
            add('box outside image', f'{where}: bbox {box} extends past the {im["width"]}x{im["height"]} '
                'image (clipped when loading)', error=False)


def _check_files(root, images: list, add: Callable) -> str:
    """Reports frame files missing under ``root`` (see :func:`_resolve_image_root`); returns the
    folder the file names were resolved against."""
    base = _resolve_image_root(Path(root), images)
    if not Path(root).is_dir():
        add('missing frame', f'image root {root} does not exist')
    else:
        for im in images:
            if isinstance(im, dict) and isinstance(im.get('file_name'), str):
                if not (base / im['file_name']).is_file():
                    add('missing frame', f'image id {im.get("id")!r}: {base / im["file_name"]} not found')
    return str(base)
