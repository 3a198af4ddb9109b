"""ImageNet VID/DET (ILSVRC2015) XML annotations -> COCO-VID JSON (``viddet convert``).

The JSON schema is exactly the one of MMTracking 0.14's converters
(``tools/convert_datasets/ilsvrc/imagenet2coco_vid.py`` ``convert_vid`` and ``imagenet2coco_det.py``),
so that MMTracking configs and checkpoints see the same data (:mod:`viddet.data.check` validates
the result):

* ``imagenet_vid_{train,val}.json``: top-level keys ``categories``, ``videos``, ``images``,
  ``annotations`` (in that order); every frame of every listed video is an image; image ids are
  global, 1-based and consecutive in list order (for val they therefore equal the global frame ids
  of ``VID_val_videos.txt`` that the official devkit and the motion-IoU ``.mat`` use);
  boxes are ``[xmin, ymin, xmax - xmin, ymax - ymin]`` (integers, no +1), ``area = w * h``.
* ``imagenet_det_30plus1cls.json``: the DET images listed in ``DET_train_30classes.txt``
  (``is_vid_train_frame`` True) followed by every other DET training XML (False); synsets outside
  the 30 VID classes get category 31 ``other_categeries`` (sic, as in MMTracking).

Training-frame off-by-one (``parse_train_list`` of ``imagenet2coco_vid.py``): the third column of
``VID_train_15frames.txt`` is a 0-based frame number (FGFA's ``ImageNetVID.load_image_set_index``
in ``lib/dataset/imagenet_vid.py`` uses it as the ``%06d`` file name as it is), but MMTracking
subtracts 1 from it, so its JSON marks the frame *before* each listed frame as a training frame and
loses the 144 frames listed as ``0`` (57,690 instead of 57,834 training frames). viddet uses the listed frame by default; ``mmtracking_compat=True`` reproduces
MMTracking's JSON byte for byte (the published checkpoints were trained on it).

The list files are looked up in ``<root>/Lists`` (MMTracking's layout) and then
``<root>/ImageSets`` (the ILSVRC2015 release layout).
"""
from __future__ import annotations

import glob
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from viddet.classes import VID_CLASSES, VID_SYNSETS
from viddet.data.ilsvrc import find_lists_dir, parse_ilsvrc_xml, parse_train_list, parse_val_list, read_list_file
from viddet.data.output_paths import check_output_dir
from viddet.errors import VidDetError
from viddet.fileio import atomic_write_json

SYNSET_TO_CAT_ID = {s: i for i, s in enumerate(VID_SYNSETS, 1)}
"""WordNet synset -> COCO category id (1..30)."""

DET_OTHER_CATEGORY_ID = 31
DET_SUBSETS = ('train/ILSVRC2013_train', 'train/ILSVRC2014_train_0000',
               'train/ILSVRC2014_train_0001', 'train/ILSVRC2014_train_0002',
               'train/ILSVRC2014_train_0003', 'train/ILSVRC2014_train_0004',
               'train/ILSVRC2014_train_0005', 'train/ILSVRC2014_train_0006')
"""DET training subsets scanned for XMLs, in MMTracking's order (ILSVRC2013 has synset subfolders)."""


def vid_categories() -> List[dict]:
    """The 30 ``categories`` entries: ``{id 1..30, name, encode_name (synset)}``."""
    return [dict(id=i, name=n, encode_name=s) for i, (n, s) in enumerate(zip(VID_CLASSES, VID_SYNSETS), 1)]


def det_categories() -> List[dict]:
    """The 31 DET ``categories``: the 30 VID classes plus ``{id 31, 'other_categeries', None}``."""
    return vid_categories() + [dict(id=DET_OTHER_CATEGORY_ID, name='other_categeries', encode_name=None)]


# ------------------------------------------------------------------------------------ reports
@dataclass
class ConvertSummary:
    """What one conversion produced (printed at the end of ``viddet convert``).

    Attributes:
        split: 'train', 'val' or 'det'.
        out_path: the JSON written ('' when nothing was written).
        num_videos, num_images, num_annotations: counts in the JSON.
        num_train_frames: images with ``is_vid_train_frame`` True (MMTracking's own printout counts
            list entries instead, including the -1 ones of the off-by-one).
        num_no_objects: images whose XML has no ``object``.
        num_unknown_synsets: XML objects skipped because their synset is not one of the 30 (VID only).
        class_counts: annotations per category name.
        bad_files: (path, problem) of every XML that could not be used (only with ``skip_bad``).
        warnings: other remarks (e.g. val start ids that disagree with the image ids).
    """

    split: str
    out_path: str = ''
    num_videos: int = 0
    num_images: int = 0
    num_annotations: int = 0
    num_train_frames: int = 0
    num_no_objects: int = 0
    num_unknown_synsets: int = 0
    class_counts: Dict[str, int] = field(default_factory=dict)
    bad_files: List[Tuple[str, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def format(self, max_listed: int = 20) -> str:
        """Human-readable multi-line summary."""
        lines = [f'----- ImageNet {self.split} -> {self.out_path or "(not written)"}',
                 f'{self.num_videos} videos, {self.num_images} images, '
                 f'{self.num_train_frames} training frames, {self.num_annotations} objects, '
                 f'{self.num_no_objects} images without objects']
        if self.num_unknown_synsets:
            lines.append(f'{self.num_unknown_synsets} objects of other synsets skipped')
        if self.class_counts:
            lines.append('objects per class: ' + ', '.join(f'{k} {v}' for k, v in self.class_counts.items() if v))
        for w in self.warnings:
            lines.append(f'warning: {w}')
        if self.bad_files:
            lines.append(f'{len(self.bad_files)} bad annotation files (frames kept without objects):')
            for p, why in self.bad_files[:max_listed]:
                lines.append(f'  {p}: {why}')
            if len(self.bad_files) > max_listed:
                lines.append(f'  ... and {len(self.bad_files) - max_listed} more')
        return '\n'.join(lines)


# ------------------------------------------------------------------------------------ helpers
def _read_xml(path, video: bool, skip_bad: bool, summary: ConvertSummary) -> Optional[dict]:
    """:func:`parse_ilsvrc_xml`; with ``skip_bad`` a bad file gives None and is listed in
    ``summary.bad_files`` instead of raising."""
    try:
        return parse_ilsvrc_xml(path, video=video)
    except VidDetError as e:
        if not skip_bad:
            raise
        summary.bad_files.append((str(path), str(e).split(': ', 1)[-1]))
        return None


def _image_size_from_file(path) -> Optional[Tuple[int, int]]:
    """(width, height) from the image header, or None."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception:  # noqa: BLE001 - any unreadable image just means "unknown size"
        return None


# ------------------------------------------------------------------------------------ VID
def convert_vid_split(root, mode: str = 'train', mmtracking_compat: bool = False, skip_bad: bool = False,
                      progress: bool = True) -> Tuple[dict, ConvertSummary]:
    """Builds the COCO-VID dict of one ImageNet VID split (MMTracking ``convert_vid``).

    Args:
        root: the ILSVRC folder (with ``Annotations/VID/<mode>`` and ``Lists`` or ``ImageSets``).
        mode: 'train' (videos of ``VID_train_15frames.txt``) or 'val' (``VID_val_videos.txt``).
        mmtracking_compat: reproduce MMTracking's training-frame off-by-one (module docstring).
        skip_bad: if False, the first missing or malformed XML raises; if True, such a frame is
            kept as an image without objects (size from its JPEG header, else from another frame
            of the video) and reported in ``summary.bad_files``.
        progress: show a tqdm bar over videos.

    Returns:
        (COCO-VID dict with keys categories, videos, images, annotations; summary).

    Raises:
        VidDetError: missing list file or (``skip_bad`` False) a bad XML, naming the file.
    """
    if mode not in ('train', 'val'):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    root = Path(root)
    lists = find_lists_dir(root)
    if mode == 'train':
        vid_infos = parse_train_list(lists / 'VID_train_15frames.txt', mmtracking_compat)
    else:
        vid_infos = parse_val_list(lists / 'VID_val_videos.txt')
    summary = ConvertSummary(split=mode)
    counts = {c['id']: 0 for c in vid_categories()}
    out = OrderedDict(categories=vid_categories(), videos=[], images=[], annotations=[])
    ids = _NextIds()
    for vid_id, (name, info) in enumerate(tqdm(vid_infos.items(), desc=f'ImageNet VID {mode}',
                                               unit='video', disable=not progress), 1):
        train_frames = info.get('vid_train_frames', [])
        out['videos'].append(dict(id=vid_id, name=name, vid_train_frames=list(train_frames)))
        if mode == 'val' and info['start'] != ids.image:
            summary.warnings.append(f'{name}: list start id {info["start"]} differs from its first image id '
                                    f'{ids.image}; image ids will not be the global frame ids')
        _convert_video(root, name, vid_id, info['num_frames'], set(train_frames), skip_bad,
                       out, counts, summary, ids)
    summary.num_videos = len(out['videos'])
    summary.num_images = len(out['images'])
    summary.num_train_frames = sum(1 for im in out['images'] if im['is_vid_train_frame'])
    summary.num_annotations = len(out['annotations'])
    summary.class_counts = {VID_CLASSES[k - 1]: v for k, v in counts.items()}
    return out, summary


@dataclass
class _NextIds:
    """The next image, annotation and instance ids of a VID split (global, 1-based, consecutive)."""

    image: int = 1
    annotation: int = 1
    instance: int = 1


def _convert_video(root: Path, name: str, vid_id: int, num_frames: int, train_set: set, skip_bad: bool,
                   out: dict, counts: Dict[int, int], summary: ConvertSummary, ids: _NextIds) -> None:
    """Appends the images and annotations of video ``name`` to ``out`` (ids from ``ids``, which it
    advances), counting objects per category in ``counts`` and problems in ``summary``."""
    xml_dir = root / 'Annotations' / 'VID'
    img_dir = root / 'Data' / 'VID'
    track_to_instance: Dict[str, int] = {}
    sizeless = []  # images whose size must be filled in from another frame
    known_size = None
    for frame_id in range(num_frames):
        prefix = f'{name}/{frame_id:06d}'
        xml_path = xml_dir / f'{prefix}.xml'
        rec = _read_xml(xml_path, True, skip_bad, summary)
        image = OrderedDict(file_name=f'{prefix}.JPEG', height=0, width=0, id=ids.image,
                            frame_id=frame_id, video_id=vid_id, is_vid_train_frame=frame_id in train_set)
        out['images'].append(image)
        if rec is None:
            wh = _image_size_from_file(img_dir / f'{prefix}.JPEG')
            if wh is None:
                sizeless.append(image)
            else:
                image['width'], image['height'] = wh
            ids.image += 1
            continue
        image['height'], image['width'] = rec['height'], rec['width']
        known_size = known_size or (rec['width'], rec['height'])
        if not rec['objects']:
            summary.num_no_objects += 1
        _add_vid_objects(rec['objects'], vid_id, out, counts, summary, ids, track_to_instance)
        ids.image += 1
    for image in sizeless:
        if known_size is None:
            summary.warnings.append(f'{image["file_name"]}: size unknown (no readable XML or JPEG in '
                                    'its video); width/height set to 0')
        else:
            image['width'], image['height'] = known_size


def _add_vid_objects(objects: List[dict], vid_id: int, out: dict, counts: Dict[int, int],
                     summary: ConvertSummary, ids: _NextIds, track_to_instance: Dict[str, int]) -> None:
    """Appends one frame's objects (:func:`parse_ilsvrc_xml` records) as annotations of image
    ``ids.image``; a new track id of the video gets the next instance id."""
    for obj in objects:
        cat = SYNSET_TO_CAT_ID.get(obj['name'])
        if cat is None:
            summary.num_unknown_synsets += 1
            continue
        w, h = obj['xmax'] - obj['xmin'], obj['ymax'] - obj['ymin']
        inst = track_to_instance.get(obj['trackid'])
        if inst is None:
            inst = track_to_instance[obj['trackid']] = ids.instance
            ids.instance += 1
        out['annotations'].append(OrderedDict(
            id=ids.annotation, video_id=vid_id, image_id=ids.image, category_id=cat, instance_id=inst,
            bbox=[obj['xmin'], obj['ymin'], w, h], area=w * h, iscrowd=False,
            occluded=obj['occluded'], generated=obj['generated']))
        counts[cat] += 1
        ids.annotation += 1


# ------------------------------------------------------------------------------------ DET
def convert_det(root, skip_bad: bool = False, progress: bool = True) -> Tuple[Optional[dict], ConvertSummary]:
    """Builds ``imagenet_det_30plus1cls.json`` content (MMTracking ``imagenet2coco_det.py``).

    Images of ``DET_train_30classes.txt`` come first (``is_vid_train_frame`` True), then every other
    XML under the eight :data:`DET_SUBSETS` (sorted paths per subset) with False. Images have
    ``{file_name 'train/…/name.JPEG', height, width, id, is_vid_train_frame}``; annotations
    ``{id, image_id, category_id (1..31), bbox, area, iscrowd}``.

    Returns:
        (dict or None when ``<root>/Annotations/DET`` or the DET list is absent, summary; the
        summary's warnings say why nothing was converted).

    Raises:
        VidDetError: (``skip_bad`` False) a missing or malformed XML, naming the file.
    """
    root = Path(root)
    summary = ConvertSummary(split='det')
    ann_root = root / 'Annotations' / 'DET'
    if not ann_root.is_dir():
        summary.warnings.append(f'{ann_root} does not exist: ImageNet DET not converted')
        return None, summary
    try:
        list_path = find_lists_dir(root) / 'DET_train_30classes.txt'
    except VidDetError as e:
        summary.warnings.append(f'{e}: ImageNet DET not converted')
        return None, summary
    if not list_path.is_file():
        summary.warnings.append(f'{list_path} does not exist: ImageNet DET not converted')
        return None, summary
    listed = [f'{parts[0]}.JPEG' for _, parts in read_list_file(list_path)]
    listed_set = set(listed)
    todo: List[Tuple[str, Path, bool]] = [(n, ann_root / n.replace('JPEG', 'xml'), True) for n in listed]
    for sub in DET_SUBSETS:
        base = ann_root / sub
        pattern = os.path.join(str(base), '*', '*.xml') if sub == 'train/ILSVRC2013_train' \
            else os.path.join(str(base), '*.xml')
        for xml_path in sorted(glob.glob(pattern)):
            img_name = sub + xml_path[len(str(base)):].replace(os.sep, '/')
            img_name = img_name[:-len('.xml')] + '.JPEG'
            if img_name in listed_set:
                continue
            todo.append((img_name, Path(xml_path), False))
    out = OrderedDict(categories=det_categories(), images=[], annotations=[])
    counts = {c['id']: 0 for c in det_categories()}
    img_id = ann_id = 1
    for img_name, xml_path, is_train in tqdm(todo, desc='ImageNet DET', unit='image', disable=not progress):
        rec = _read_xml(xml_path, False, skip_bad, summary)
        if rec is None:
            wh = _image_size_from_file(root / 'Data' / 'DET' / img_name) or (0, 0)
            rec = dict(width=wh[0], height=wh[1], objects=[])
        out['images'].append(OrderedDict(file_name=img_name, height=rec['height'], width=rec['width'],
                                         id=img_id, is_vid_train_frame=is_train))
        summary.num_train_frames += int(is_train)
        if not rec['objects']:
            summary.num_no_objects += 1
        for obj in rec['objects']:
            cat = SYNSET_TO_CAT_ID.get(obj['name'], DET_OTHER_CATEGORY_ID)
            w, h = obj['xmax'] - obj['xmin'], obj['ymax'] - obj['ymin']
            out['annotations'].append(OrderedDict(id=ann_id, image_id=img_id, category_id=cat,
                                                  bbox=[obj['xmin'], obj['ymin'], w, h], area=w * h,
                                                  iscrowd=False))
            counts[cat] += 1
            ann_id += 1
        img_id += 1
    summary.num_images = len(out['images'])
    summary.num_annotations = len(out['annotations'])
    summary.class_counts = {c['name']: counts[c['id']] for c in det_categories()}
    return out, summary


# ------------------------------------------------------------------------------------ driver
VID_OUTPUT_NAMES = {'train': 'imagenet_vid_train.json', 'val': 'imagenet_vid_val.json',
                    'det': 'imagenet_det_30plus1cls.json'}


def convert_imagenet_vid(root, out_dir, mmtracking_compat: bool = False, skip_bad: bool = False,
                         splits: Sequence[str] = ('train', 'val', 'det'), progress: bool = True,
                         verbose: bool = True) -> Dict[str, ConvertSummary]:
    """Converts ILSVRC2015 VID (and DET when present) to MMTracking's COCO-VID JSON files.

    Writes ``imagenet_vid_train.json``, ``imagenet_vid_val.json`` and, if ``<root>/Annotations/DET``
    and ``DET_train_30classes.txt`` exist, ``imagenet_det_30plus1cls.json`` into ``out_dir``
    (atomically). Equivalent to MMTracking's ``imagenet2coco_vid.py -i root -o out_dir`` (+
    ``imagenet2coco_det.py``), except for the training-frame fix (see module docstring).

    Args:
        root: ILSVRC folder with ``Annotations/VID/{train,val}`` and ``Lists/`` or ``ImageSets/``.
        out_dir: output folder (created).
        mmtracking_compat: reproduce MMTracking's ``frame - 1`` training-frame shift.
        skip_bad: collect bad XMLs in the summaries instead of raising on the first one.
        splits: any of 'train', 'val', 'det'.
        progress: tqdm bars. verbose: print each summary when done.

    Returns:
        split -> :class:`ConvertSummary`.

    Raises:
        VidDetError: an output folder that cannot be written (checked first), missing root/list files
            or a bad XML (without ``skip_bad``), naming the file.
    """
    out_dir = check_output_dir(out_dir, '--out')
    root = Path(root)
    if not root.is_dir():
        raise VidDetError(f'{root}: ImageNet VID root folder not found')
    for s in splits:
        if s not in VID_OUTPUT_NAMES:
            raise VidDetError(f'unknown split {s!r}; choose from train, val, det')
    summaries = {}
    for s in splits:
        if s == 'det':
            data, summary = convert_det(root, skip_bad=skip_bad, progress=progress)
        else:
            if not (root / 'Annotations' / 'VID' / s).is_dir():
                raise VidDetError(f'{root / "Annotations" / "VID" / s}: folder not found '
                                  '(expected the ILSVRC2015 layout Annotations/VID/{train,val})')
            data, summary = convert_vid_split(root, s, mmtracking_compat, skip_bad, progress)
        if data is not None:
            path = atomic_write_json(out_dir / VID_OUTPUT_NAMES[s], data)
            summary.out_path = str(path)
        summaries[s] = summary
        if verbose:
            print(summary.format())
    return summaries
