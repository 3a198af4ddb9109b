"""The training data of ``viddet train``: the training sets checked before a run starts, the
epoch's sample order, and each process's micro-batches.

Determinism and batching
    Every sample is a pure function of ``(schedule.seed, epoch, dataset index)``: the epoch's
    order is a seeded permutation, and each item is loaded with its own ``random.Random`` (reference
    frames, flips, HSV jitter) and its own ``torch.Generator`` (the method's sampling during training), derived
    from that triple. So the data does not depend on the number of processes, DataLoader workers,
    or on whether training was interrupted:

    * optimizer step ``s`` of an epoch consumes the consecutive slice ``order[s*B:(s+1)*B]``,
      B = world_size x samples_per_gpu x accumulate (the last slice wraps around to the epoch's
      start, like ``DistributedSampler`` padding); rank r takes the r-th part of it and splits it
      into ``accumulate`` micro-batches (:class:`TrainLoader`);
    * each micro-batch's loss is the mean of its samples' losses divided by ``accumulate``, and DDP
      averages gradients over ranks, so the gradient is the mean over the B samples whatever the
      split — ``--accumulate k`` on one process reproduces k processes (or a k x larger batch),
      up to float summation order.
"""
from __future__ import annotations

import math
import os
import random
import signal
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from viddet.config.training import Config
from viddet.errors import VidDetError
from viddet.structures import TrainSample


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of ``epoch`` (independent of process layout); all >= 0."""
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(s[0]) << 31) ^ int(s[1])) & ((1 << 63) - 1)


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The epoch's sample order: a permutation of range(n) seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, 1 << 40))
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, total_batch: int) -> int:
    """Optimizer steps per epoch: ceil(n / total_batch) (the last batch wraps around)."""
    return max(1, math.ceil(n / total_batch))


def step_indices(order: Sequence[int], step: int, total_batch: int) -> List[int]:
    """The ``total_batch`` dataset indices of optimizer step ``step`` (wrapping around the order)."""
    n = len(order)
    return [order[(step * total_batch + i) % n] for i in range(total_batch)]


class LoadFailure:
    """An item that could not be loaded (its :class:`VidDetError` message). It travels from a
    DataLoader worker to the main process as data, so that the user reads the one-line message
    instead of "Caught VidDetError in DataLoader worker process 0. Original Traceback…"."""

    def __init__(self, message: str):
        self.message = message


class SeededTrainSet(torch.utils.data.Dataset):
    """Training items keyed by ``(epoch, index)``, each drawn with its own seeded RNGs.

    Wraps :class:`viddet.data.video_dataset.VideoDataset` objects (concatenated) and returns
    :class:`viddet.structures.TrainSample` (or a :class:`LoadFailure`). The sub-dataset's ``rng``
    (reference sampling, flips, HSV jitter) is set to ``random.Random(sample_seed(seed, epoch, index))`` just
    before the item is loaded, and the sample's ``seed`` (the method's sampling) is derived from the
    same triple.
    """

    def __init__(self, datasets: Sequence, seed: int):
        self.datasets = list(datasets)
        self.seed = seed
        self.cum = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.cum[-1] if self.cum else 0

    def locate(self, index: int):
        for d, c in zip(self.datasets, self.cum):
            if index < c:
                return d, index - (c - len(d))
        raise IndexError(index)

    def __getitem__(self, key):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        ds, local = self.locate(index)
        ds.rng = random.Random(s)
        try:
            item = ds[local]
        except VidDetError as e:
            return LoadFailure(str(e))
        return TrainSample(img=item['img'], ref_imgs=item['ref_imgs'], metas=list(item['img_metas']),
                           gt_bboxes=item['gt_bboxes'].float(), gt_labels=item['gt_labels'].long(),
                           is_video_data=bool(item['is_video_data']), seed=s ^ 0x5DEECE66D,
                           ref_gt_bboxes=[b.float() for b in item['ref_gt_bboxes']],
                           ref_gt_labels=[lb.long() for lb in item['ref_gt_labels']])


def build_train_set(cfg: Config, say: Callable[[str], None] = print) -> SeededTrainSet:
    """The concatenated training sets of ``cfg.data.train`` (MMTracking: VID + DET), each checked
    before training starts: categories (:func:`check_categories`) and frame files; ``say`` gets a
    line for every set of which categories are left out (:func:`dropped_classes`).

    Raises:
        VidDetError: a set without usable training image, categories that do not fit
            ``model.classes``, or missing / unreadable frame files (naming the first and the count).
    """
    from viddet.data.video_dataset import VideoDataset
    from viddet.methods import method_class
    sets = []
    for i, t in enumerate(cfg.data.train):
        ref = None
        if t.ref_sampler is not None and t.ref_sampler.num_ref_imgs > 0:
            r = t.ref_sampler
            ref = dict(num_ref_imgs=r.num_ref_imgs, frame_range=r.frame_range,
                       filter_key_img=r.filter_key_img, method=r.method)
        method = method_class(cfg.model.method)
        ds = VideoDataset(t.ann_file, t.img_prefix, load_as_video=t.load_as_video, ref_sampler=ref,
                          classes=cfg.model.classes, min_size=cfg.data.min_size, img_scale=tuple(cfg.data.scale),
                          flip_ratio=cfg.data.flip_ratio, transform=method.train_transform,
                          per_frame_augment=method.per_frame_augment, hsv_prob=cfg.data.hsv_prob)
        where = f'{cfg.source}: data.train.{i} ({t.ann_file})'
        check_categories(ds, cfg.model.classes, where)
        dropped = dropped_classes(ds, cfg.data.min_size)
        if dropped:
            say(f'{where}: {dropped}')
        if len(ds) == 0:
            raise VidDetError(f'{where} has no usable training image '
                              f'(none with an annotation of the {cfg.model.num_classes} classes)')
        check_frame_files(train_frame_files(ds), f'{where}: data.train.{i}.img_prefix {t.img_prefix}')
        sets.append(ds)
    return SeededTrainSet(sets, cfg.schedule.seed)


def check_categories(ds, classes: Sequence[str], where: str) -> None:
    """A training set's labels are the positions of ``classes`` among the file's categories, in
    the file's order (mmdet ``CocoDataset.cat2label``), so every class must be one of the file's
    categories, and in the same order, or labels and class names would disagree.

    Raises:
        VidDetError: a class the file has no category of, or another order (naming both).
    """
    names = [c.get('name') for c in ds.index.categories]
    absent = [c for c in classes if c not in names]
    if absent:
        raise VidDetError(f'{where}: model.classes lists {", ".join(absent)}, which the file has no category of '
                          f'(its categories: {", ".join(map(str, names[:12]))}{" …" if len(names) > 12 else ""})')
    order = [n for n in names if n in set(classes)]
    if order != list(classes):
        raise VidDetError(f'{where}: the file lists the classes in another order ({", ".join(order)}); labels '
                          f'follow the file, so list model.classes in that order')


def dropped_classes(ds, min_size: int) -> Optional[str]:
    """What a training set leaves out because ``model.classes`` does not list some of the file's
    annotated categories (a fine-tuning config listing a subset): those classes, the training frames
    annotated with them only (not trained on: ``N of M samples``) and their boxes in the frames kept
    (background there). None when every annotated category is a class.
    """
    names = {c.get('id'): c.get('name') for c in ds.index.categories if isinstance(c, dict)}
    anns = [a for group in ds.index.img_to_anns.values() for a in group]
    dropped_ids = {a['category_id'] for a in anns} - set(ds.cat2label)
    if not dropped_ids:
        return None
    kept = {info['id'] for info in ds.data_infos}
    lost = set()
    for img_id in {a['image_id'] for a in anns if a['category_id'] in dropped_ids} - kept:
        info = ds.index.imgs.get(img_id, {})
        if info.get('is_vid_train_frame', True) and min(info.get('width', 0), info.get('height', 0)) >= min_size:
            lost.add(img_id)
    boxes = sum(1 for a in anns if a['category_id'] in dropped_ids and a['image_id'] in kept)
    classes = ', '.join(sorted(str(names.get(c, c)) for c in dropped_ids))
    return (f"the file's class(es) {classes} are not in model.classes: {len(lost)} training frame(s) annotated "
            f'only with them are dropped (training on {len(kept)} of {len(kept) + len(lost)} samples), and their '
            f'{boxes} box(es) in the frames kept count as background')


def train_frame_files(ds) -> List[Path]:
    """Every frame file a training set can load: the key frames, and with reference frames every
    frame of their videos."""
    if ds.ref_sampler is None or not ds.load_as_video:
        return [ds.image_path(info) for info in ds.data_infos]
    videos = dict.fromkeys(info['video_id'] for info in ds.data_infos)
    return [ds.image_path(ds.index.imgs[i]) for v in videos for i in ds.index.vid_to_img_ids[v]]


def check_frame_files(files: Sequence[Path], what: str) -> None:
    """Checks that every frame file exists and is readable before training starts.

    Raises:
        VidDetError: naming ``what``, the first bad file and how many there are.
    """
    bad = [f for f in files if not (f.is_file() and os.access(f, os.R_OK))]
    if bad:
        state = 'is not readable' if bad[0].is_file() else 'does not exist'
        raise VidDetError(f'{what}: frame file {bad[0]} {state} ({len(bad)} of {len(files)} frame files missing '
                          f'or unreadable; is the folder right?)')


def val_frame_files(cfg: Config) -> List[Path]:
    """The frame files the evaluation on ``cfg.data.val`` reads."""
    from viddet.engine.evaluate import load_videos
    v = cfg.data.val
    videos, _ = load_videos(v.ann_file)
    return [Path(v.img_prefix) / im['file_name'] for _, imgs in videos[:v.max_videos] for im in imgs]


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C (the terminal sends it to them too): the main process
    finishes its step and saves a checkpoint, which needs the workers' data
    (:mod:`viddet.interrupts`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _collate(items):
    return list(items)


class TrainLoader:
    """One process's share of the training data: for each optimizer step of an epoch,
    ``accumulate`` micro-batches of ``samples_per_gpu`` samples (see the module docstring).

    Args:
        train_set: the :class:`SeededTrainSet`.
        cfg: the run's config (``data.samples_per_gpu``, ``data.workers``, ``schedule.seed``, and
            ``source`` for messages).
        rank, world: this process and the number of processes.
        accumulate: micro-batches per optimizer step.
        device: where the samples go.
    """

    def __init__(self, train_set: SeededTrainSet, cfg: Config, rank: int, world: int, accumulate: int,
                 device: torch.device):
        self.train_set, self.cfg, self.rank, self.device = train_set, cfg, rank, device
        self.samples_per_gpu, self.accumulate = cfg.data.samples_per_gpu, accumulate
        self.total_batch = world * self.samples_per_gpu * accumulate
        self.steps_per_epoch = steps_per_epoch(len(train_set), self.total_batch)

    def micro_batches(self, epoch: int, first_step: int) -> Iterator[List[TrainSample]]:
        """This rank's micro-batches of the epoch's steps ``first_step..`` in order, on the device
        (the DataLoader starts now; its workers load ahead).

        Raises (while iterating):
            VidDetError: an item that cannot be loaded (naming the config and the item's problem).
        """
        spg, acc, tb = self.samples_per_gpu, self.accumulate, self.total_batch
        order = epoch_order(len(self.train_set), self.cfg.schedule.seed, epoch)
        keys = []
        for s in range(first_step, self.steps_per_epoch):
            idx = step_indices(order, s, tb)[self.rank * spg * acc:(self.rank + 1) * spg * acc]
            keys.extend([(epoch, i) for i in idx[j * spg:(j + 1) * spg]] for j in range(acc))
        loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=keys, num_workers=self.cfg.data.workers,
                                             collate_fn=_collate, pin_memory=False,
                                             worker_init_fn=_ignore_interrupts if self.cfg.data.workers else None)
        return self._on_device(iter(loader))

    def _on_device(self, batches) -> Iterator[List[TrainSample]]:
        for items in batches:
            for x in items:
                if isinstance(x, LoadFailure):
                    raise VidDetError(f'{self.cfg.source}: a training item cannot be loaded: {x.message}')
            yield [x.to(self.device) for x in items]
