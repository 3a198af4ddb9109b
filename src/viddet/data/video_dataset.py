"""COCO-VID training data as MMTracking v0.14 serves it: key frames, their reference frames and the
shared train transforms.

* loading (``ImagenetVIDDataset.load_video_anns`` / ``load_image_anns`` in
  ``mmtrack/datasets/imagenet_vid_dataset.py``): VID training uses the frames with
  ``is_vid_train_frame`` (video by video, frame order); references are drawn from **all** frames
  of the video. DET images (``load_as_video=False``, only those with ``is_vid_train_frame``) are
  one-frame videos: their "references" are copies of the key image.
* annotation parsing (``CocoVideoDataset._parse_ann_info``, ``mmtrack/datasets/coco_video_dataset.py``):
  :func:`parse_ann_info`.
* training filter (mmdet-2.x ``CocoDataset._filter_imgs``, ``mmdet/datasets/coco.py``): drop images
  without an annotation of the dataset's classes (``filter_empty_gt``) or with
  ``min(width, height) < min_size`` (32).
* reference sampling (``CocoVideoDataset.ref_img_sampling``, training methods ``uniform`` and
  ``bilateral_uniform``): :func:`sample_ref_frames`. The test-time protocols live with the methods
  (:func:`viddet.methods.selsa.adaptive_stride_refs`, :meth:`viddet.methods.fgfa.FGFA.window`).
* training transforms (:mod:`viddet.data.sequence`: ``SeqResize(keep_ratio) -> SeqRandomFlip(share_params) -> SeqNormalize ->
  SeqPad(16)`` of ``mmtrack/datasets/pipelines/transforms.py``): key and references are resized to
  the same ``img_scale`` and flipped together; boxes are scaled by ``scale_factor``, clipped to the
  resized image and mirrored (``x -> W - x``). A method with ``per_frame_augment`` (the YOLOV family)
  instead flips each frame on its own and jitters it in HSV (:mod:`viddet.data.frame_augment`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from viddet.classes import VID_CLASSES
from viddet.errors import VidDetError
from viddet.data.frame_augment import augment_frames
from viddet.data.sequence import load_image, placed_boxes, prepare_sequence, transform_sequence
from viddet.data.transforms import DEFAULT_SCALE
from viddet.fileio import read_json

SAMPLER_METHODS = ('uniform', 'bilateral_uniform')
"""The training methods of MMTracking's ``ref_img_sampling`` (the configs set them per method)."""


# ===================================================================================== samplers
@dataclass
class RefSample:
    """Reference frames chosen for one key frame.

    Attributes:
        frame_ids: reference frame indices (0-based, within the video), sorted ascending; for
            non-video data the key's own index repeated ``num_ref_imgs`` times.
    """

    frame_ids: List[int]


def normalize_frame_range(frame_range) -> List[int]:
    """``int r`` -> ``[-r, r]``; a 2-list ``[lo, hi]`` with ``lo <= 0 <= hi`` is returned as is.

    Raises:
        VidDetError: a negative int, a list of other length, non-int entries or wrong signs.
    """
    if isinstance(frame_range, bool):
        raise VidDetError(f'frame_range must be an int or a list of 2 ints, got {frame_range!r}')
    if isinstance(frame_range, int):
        if frame_range < 0:
            raise VidDetError(f'frame_range {frame_range} can not be negative')
        return [-frame_range, frame_range]
    if isinstance(frame_range, (list, tuple)):
        if len(frame_range) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in frame_range):
            raise VidDetError(f'frame_range {frame_range!r} must be 2 ints [lo, hi]')
        if not (frame_range[0] <= 0 <= frame_range[1]):
            raise VidDetError(f'frame_range {frame_range!r} must satisfy lo <= 0 <= hi')
        return [int(frame_range[0]), int(frame_range[1])]
    raise VidDetError(f'frame_range must be an int or a list of 2 ints, got {type(frame_range).__name__}')


def sample_ref_frames(frame_id: int, num_frames: int, *, frame_range=10, num_ref_imgs: int = 1,
                      filter_key_img: bool = True, method: str = 'uniform', is_video: bool = True,
                      rng: Optional[random.Random] = None) -> RefSample:
    """MMTracking ``CocoVideoDataset.ref_img_sampling`` on frame indices (training methods).

    Args:
        frame_id: the key frame's 0-based index in its video (negative: treated as non-video).
        num_frames: number of frames of the video.
        frame_range: int r (= [-r, r]) or [lo, hi], in frames.
        num_ref_imgs: number of references.
        filter_key_img: exclude the key frame from the candidates.
        method: 'uniform' (``random.sample`` of ``num_ref_imgs`` frames from
            [max(0, f+lo), min(f+hi, L-1)]) or 'bilateral_uniform' (half from [f+lo, f], half from
            [f, f+hi], each without the key when filtered).
        is_video: False for DET images (``load_as_video=False``); then, as for frame_id < 0 or
            frame_range [0, 0], the references are ``num_ref_imgs`` copies of the key.
        rng: ``random.Random`` (default: the global ``random`` module, which torch's DataLoader
            reseeds per worker). Same draws as MMTracking for the same state.

    Returns:
        :class:`RefSample` (frame ids sorted, like MMTracking's ``sorted(..., key=frame_id)``).

    Raises:
        VidDetError: unknown method, bad frame_range, odd ``num_ref_imgs`` for bilateral sampling,
            or frame_id >= num_frames.
    """
    rng = rng if rng is not None else random
    if method not in SAMPLER_METHODS:
        raise VidDetError(f'unknown reference sampling method {method!r}; choose from {", ".join(SAMPLER_METHODS)}')
    lo, hi = normalize_frame_range(frame_range)
    if not is_video or frame_id < 0 or (lo == 0 and hi == 0):
        return RefSample(frame_ids=[frame_id] * num_ref_imgs)
    if frame_id >= num_frames:
        raise VidDetError(f'frame {frame_id} is outside a video of {num_frames} frames')
    left = max(0, frame_id + lo)
    right = min(frame_id + hi, num_frames - 1)
    out: List[int] = []
    if method == 'uniform':
        valid = list(range(left, right + 1))
        if filter_key_img and frame_id in valid:
            valid.remove(frame_id)
        out.extend(rng.sample(valid, min(num_ref_imgs, len(valid))))
    else:  # bilateral_uniform
        if num_ref_imgs % 2:
            raise VidDetError(f'bilateral_uniform sampling needs an even num_ref_imgs, got {num_ref_imgs}')
        for side in (list(range(left, frame_id + 1)), list(range(frame_id, right + 1))):
            if filter_key_img and frame_id in side:
                side.remove(frame_id)
            out.extend(rng.sample(side, min(num_ref_imgs // 2, len(side))))
    return RefSample(frame_ids=sorted(int(f) for f in out))


# ===================================================================================== index
class CocoVideoIndex:
    """A COCO-VID annotation file indexed for video access (MMTracking's ``CocoVID`` essentials).

    Attributes:
        dataset: the loaded JSON dict.
        imgs: image id -> image dict; anns: annotation id -> dict.
        img_to_anns: image id -> annotations in file order.
        cat_to_imgs: category id -> image ids having an annotation of it.
        videos: video id -> video dict, in file order.
        vid_to_img_ids: video id -> image ids indexed by ``frame_id`` (0..n-1).
        categories: category dicts in file order.

    Raises:
        VidDetError: unreadable/invalid JSON, or a video whose frame_ids are not 0..n-1.
    """

    def __init__(self, ann: Union[str, Path, dict]):
        self.ann_file = '' if isinstance(ann, dict) else str(ann)
        data = ann if isinstance(ann, dict) else read_json(ann, 'annotation file')
        if not isinstance(data, dict) or not isinstance(data.get('images'), list):
            raise VidDetError(f'{self.ann_file or "<annotations>"}: not a COCO(-VID) file (no "images" list)')
        self.dataset = data
        self.categories = list(data.get('categories', []))
        self.imgs = {im['id']: im for im in data['images']}
        self.anns = {}
        self.img_to_anns: Dict[int, List[dict]] = {}
        self.cat_to_imgs: Dict[int, List[int]] = {}
        for a in data.get('annotations', []):
            self.anns[a['id']] = a
            self.img_to_anns.setdefault(a['image_id'], []).append(a)
            self.cat_to_imgs.setdefault(a['category_id'], []).append(a['image_id'])
        self.videos = {v['id']: v for v in data.get('videos', [])}
        by_vid: Dict[int, List[dict]] = {}
        for im in data['images']:
            if 'video_id' in im:
                by_vid.setdefault(im['video_id'], []).append(im)
        self.vid_to_img_ids: Dict[int, List[int]] = {}
        for vid, ims in by_vid.items():
            ids = [None] * len(ims)
            for im in ims:
                f = im.get('frame_id')
                if not isinstance(f, int) or not 0 <= f < len(ims) or ids[f] is not None:
                    raise VidDetError(f'{self.ann_file or "<annotations>"}: video {vid} has {len(ims)} images but '
                                      f'frame_id {f!r} (image {im["id"]}); frame_ids must be exactly 0..{len(ims) - 1}')
                ids[f] = im['id']
            self.vid_to_img_ids[vid] = ids

    def cat_ids(self, class_names: Sequence[str]) -> List[int]:
        """Ids of the categories whose name is in ``class_names``, in file order (pycocotools
        ``getCatIds(catNms=...)``; label i <-> ``cat_ids[i]``)."""
        names = set(class_names)
        return [c['id'] for c in self.categories if c.get('name') in names]


def parse_ann_info(img_info: dict, anns: Sequence[dict], cat2label: Dict[int, int], with_instance_ids: bool = True) -> dict:
    """MMTracking ``CocoVideoDataset._parse_ann_info``.

    Skips an annotation if ``ignore`` is set, if its box has zero intersection with the image, if
    ``area <= 0`` or ``w < 1`` or ``h < 1``, or if its category is not in ``cat2label``; crowd boxes
    go to ``bboxes_ignore``.

    Args:
        img_info: image dict (``width``, ``height`` in pixels).
        anns: its annotations (file order).
        cat2label: category id -> 0-based label.
        with_instance_ids: video data: ``instance_ids`` from the annotations; otherwise
            ``arange(n)`` (DET).

    Returns:
        ``{'bboxes': (n, 4) float32 x1y1x2y2 (= [x, y, x + w, y + h]), 'labels': (n,) int64,
        'bboxes_ignore': (m, 4) float32, 'instance_ids': (n,) int64}``.
    """
    boxes, labels, ignore, inst = [], [], [], []
    for a in anns:
        if a.get('ignore', False):
            continue
        x1, y1, w, h = a['bbox']
        inter_w = max(0, min(x1 + w, img_info['width']) - max(x1, 0))
        inter_h = max(0, min(y1 + h, img_info['height']) - max(y1, 0))
        if inter_w * inter_h == 0:
            continue
        if a.get('area', w * h) <= 0 or w < 1 or h < 1:
            continue
        if a['category_id'] not in cat2label:
            continue
        box = [x1, y1, x1 + w, y1 + h]
        if a.get('iscrowd', False):
            ignore.append(box)
        else:
            boxes.append(box)
            labels.append(cat2label[a['category_id']])
            if 'instance_id' in a:
                inst.append(a['instance_id'])
    out = dict(bboxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
               bboxes_ignore=np.array(ignore, np.float32).reshape(-1, 4))
    out['instance_ids'] = np.array(inst, np.int64) if with_instance_ids else np.arange(len(labels), dtype=np.int64)
    return out


# ===================================================================================== transforms
# ===================================================================================== dataset
class VideoDataset(torch.utils.data.Dataset):
    """ImageNet VID / DET (or any COCO-VID) training frames with reference frames, as MMTracking
    serves them.

    Args:
        ann_file: COCO-VID JSON (or a loaded dict).
        img_prefix: folder the ``file_name`` paths are relative to (``data/ILSVRC/Data/VID`` or
            ``.../Data/DET``).
        load_as_video: VID (True) or DET images as one-frame videos (False; only
            ``is_vid_train_frame`` images, as MMTracking's ``load_image_anns``).
        ref_sampler: dict of :func:`sample_ref_frames` keyword arguments (e.g. FGFA's
            ``dict(num_ref_imgs=2, frame_range=9, filter_key_img=True, method='bilateral_uniform')``),
            or None for key frames only.
        classes: class names; labels are positions among the file's categories with these names.
        filter_empty_gt, min_size: training filter (mmdet ``_filter_imgs``), pixels.
        img_scale: keep-ratio resize limits (long, short) in pixels.
        flip_ratio: probability of the horizontal flip: one decision for all frames of an item, or,
            with ``per_frame_augment``, each frame's own.
        rng: ``random.Random`` for reference sampling, flips and HSV jitter (default: the ``random``
            module).
        transform: the method's own preprocessing of a frame (:func:`transform_sequence`, given
            ``img_scale``), or None for MMTracking's (:func:`prepare_sequence`).
        per_frame_augment: each frame flipped on its own and HSV-jittered with probability
            ``hsv_prob`` (:func:`viddet.data.frame_augment.augment_frames`; YOLOX's ``TrainTransform``,
            the YOLOV family); needs a ``transform`` giving raw 0..255 BGR pixels (the letterbox).
        hsv_prob: probability of a frame's HSV jitter (only with ``per_frame_augment``).

    Items: ``{'img': (3, Hp, Wp) float32, 'ref_imgs': (R, 3, Hp, Wp) float32,
    'img_metas': [ImageMeta] * (1 + R) (key first), 'gt_bboxes': (n, 4) float32 x1y1x2y2 in
    resized-image pixels (clipped, flipped with the image), 'gt_labels': (n,) int64 0-based,
    'gt_instance_ids': (n,) int64, 'gt_bboxes_ignore': (m, 4) float32, 'is_video_data': bool,
    'image_id', 'video_id', 'frame_id', 'ref_frame_ids': list[int], 'ref_gt_bboxes',
    'ref_gt_labels': the references' boxes and labels, R tensors like the key's}``.

    Raises:
        VidDetError: unreadable annotation file, or an unreadable frame (when the item is loaded),
            naming the file.
        ValueError: ``per_frame_augment`` without ``transform``, or ``hsv_prob`` > 0 without
            ``per_frame_augment``.
    """

    def __init__(self, ann_file, img_prefix, *, load_as_video: bool = True, ref_sampler: Optional[dict] = None,
                 classes: Sequence[str] = VID_CLASSES, filter_empty_gt: bool = True, min_size: int = 32,
                 img_scale=DEFAULT_SCALE, flip_ratio: float = 0.5, rng: Optional[random.Random] = None,
                 transform: Optional[Callable] = None, per_frame_augment: bool = False, hsv_prob: float = 0.0):
        if per_frame_augment and transform is None:
            raise ValueError('per_frame_augment needs a transform giving raw 0..255 BGR pixels (the letterbox)')
        if hsv_prob > 0 and not per_frame_augment:
            raise ValueError(f'hsv_prob={hsv_prob} needs per_frame_augment')
        self.index = CocoVideoIndex(ann_file)
        self.img_prefix = Path(img_prefix)
        self.load_as_video = load_as_video
        self.ref_sampler = dict(ref_sampler) if ref_sampler is not None else None
        self.classes = tuple(classes)
        self.img_scale = img_scale
        self.flip_ratio = flip_ratio
        self.rng = rng if rng is not None else random
        self.transform = transform
        self.per_frame_augment = per_frame_augment
        self.hsv_prob = hsv_prob
        self.cat_ids = self.index.cat_ids(self.classes)
        self.cat2label = {c: i for i, c in enumerate(self.cat_ids)}
        if load_as_video:
            if not self.index.videos:
                where = self.index.ann_file or '<annotations>'
                raise VidDetError(f'{where}: no "videos"; use load_as_video=False for image (DET) data')
            infos = [self.index.imgs[img_id] for vid in self.index.videos
                     for img_id in self.index.vid_to_img_ids.get(vid, [])]
        else:
            infos = self.index.dataset['images']
        infos = [info for info in infos if info.get('is_vid_train_frame', True)]
        self.data_infos = self._filter(infos, filter_empty_gt, min_size)

    # mmdet CocoDataset._filter_imgs
    def _filter(self, infos, filter_empty_gt, min_size):
        ids_with_ann = set(self.index.img_to_anns)
        ids_in_cat = set()
        for c in self.cat_ids:
            ids_in_cat |= set(self.index.cat_to_imgs.get(c, []))
        ids_in_cat &= ids_with_ann
        return [info for info in infos
                if not (filter_empty_gt and info['id'] not in ids_in_cat) and min(info['width'], info['height']) >= min_size]

    def __len__(self) -> int:
        return len(self.data_infos)

    def get_ann_info(self, idx: int) -> dict:
        """Parsed annotations of item ``idx`` (:func:`parse_ann_info`), original-image pixels."""
        return self.ann_of(self.data_infos[idx])

    def ann_of(self, info: dict) -> dict:
        """Parsed annotations of the image ``info`` (:func:`parse_ann_info`), original-image pixels."""
        anns = [a for a in self.index.img_to_anns.get(info['id'], []) if a['category_id'] in self.cat2label]
        return parse_ann_info(info, anns, self.cat2label, with_instance_ids=self.load_as_video)

    def ref_infos(self, idx: int) -> Tuple[List[dict], RefSample]:
        """Image dicts of the reference frames of item ``idx`` (sorted by frame) and the sample."""
        info = self.data_infos[idx]
        if self.ref_sampler is None:
            return [], RefSample(frame_ids=[])
        if not self.load_as_video or 'video_id' not in info:
            s = sample_ref_frames(-1, 1, is_video=False, rng=self.rng, **self.ref_sampler)
            return [info] * len(s.frame_ids), s
        ids = self.index.vid_to_img_ids[info['video_id']]
        s = sample_ref_frames(info['frame_id'], len(ids), rng=self.rng, **self.ref_sampler)
        return [self.index.imgs[ids[f]] for f in s.frame_ids], s

    def image_path(self, info: dict) -> Path:
        return self.img_prefix / info['file_name']

    def __getitem__(self, idx: int) -> dict:
        info = self.data_infos[idx]
        refs, _ = self.ref_infos(idx)
        flip = not self.per_frame_augment and self.flip_ratio > 0 and self.rng.random() < self.flip_ratio
        cache: Dict[int, np.ndarray] = {}
        images = []
        for i in [info] + refs:
            if i['id'] not in cache:
                cache[i['id']] = load_image(self.image_path(i))
            images.append(cache[i['id']])
        ann = self.get_ann_info(idx)
        ref_anns = [self.ann_of(r) for r in refs]
        if self.transform is None:
            tensors, metas = prepare_sequence(images, self.img_scale, flip)
        else:
            tensors, metas = transform_sequence(images, self.transform, self.img_scale, flip)
        if self.per_frame_augment:
            unflipped = [placed_boxes(a['bboxes'], m, False) for a, m in zip([ann] + ref_anns, metas)]
            augment_frames(tensors, metas, unflipped, self.rng, self.flip_ratio, self.hsv_prob)
        boxes, ignore = (placed_boxes(ann[k], metas[0], metas[0].flip) for k in ('bboxes', 'bboxes_ignore'))
        return dict(img=tensors[0], ref_imgs=tensors[1:], img_metas=metas, is_video_data=bool(self.load_as_video),
                    image_id=info['id'], video_id=info.get('video_id', -1), frame_id=info.get('frame_id', -1),
                    ref_frame_ids=[r.get('frame_id', -1) for r in refs],
                    gt_bboxes=torch.from_numpy(boxes), gt_labels=torch.from_numpy(ann['labels']),
                    gt_instance_ids=torch.from_numpy(ann['instance_ids']), gt_bboxes_ignore=torch.from_numpy(ignore),
                    ref_gt_bboxes=[torch.from_numpy(placed_boxes(a['bboxes'], m, m.flip))
                                   for a, m in zip(ref_anns, metas[1:])],
                    ref_gt_labels=[torch.from_numpy(a['labels']) for a in ref_anns])
