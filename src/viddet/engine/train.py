"""``viddet train``: the training loop for every method, one process or many (torchrun, DDP).

Recipe: MMTracking's ImageNet VID training, one key frame per sample, losses per sample as in mmdet
(see :mod:`viddet.models.losses` and :mod:`viddet.methods`); initial weights as MMTracking's configs
give them (:mod:`viddet.engine.initial_weights`).

The loop is a :class:`Trainer` whose methods are its steps: :meth:`Trainer.setup` (checks, data,
model and its initial weights or the resumed state, work dir), then per optimizer step
:meth:`Trainer.run_step`, :meth:`Trainer.log`, and at their intervals :meth:`Trainer.save_checkpoint`
and :meth:`Trainer.evaluate` (detectron2's trainer + hooks, as plain methods).

Determinism and batching
    Every sample is a pure function of ``(schedule.seed, epoch, dataset index)``: the epoch's
    order is a seeded permutation, and each item is loaded with its own ``random.Random`` (reference
    frames, flip) and its own ``torch.Generator`` (anchor and RoI sampling), derived from that
    triple. So the data does not depend on the number of processes, DataLoader workers, or on
    whether training was interrupted:

    * optimizer step ``s`` of an epoch consumes the consecutive slice ``order[s*B:(s+1)*B]``,
      B = world_size x samples_per_gpu x accumulate (the last slice wraps around to the epoch's
      start, like ``DistributedSampler`` padding); rank r takes the r-th part of it and splits it
      into ``accumulate`` micro-batches;
    * each micro-batch's loss is the mean of its samples' losses divided by ``accumulate``, and DDP
      averages gradients over ranks, so the gradient is the mean over the B samples whatever the
      split — ``--accumulate k`` on one process reproduces k processes (or a k x larger batch),
      up to float summation order;
    * ``--resume`` restores model, optimizer, grad scaler, RNG states and the position, and skips
      the steps already done in the epoch: the continued run is bit-identical to an uninterrupted
      one (on CPU; cuDNN kernels may add GPU non-determinism), also after a kill (SIGKILL, a
      preempted machine) at any point: checkpoints are written atomically, and ``--save-interval``
      bounds what is lost.

Non-finite values: a step whose loss (or, without a loss scaler, gradient norm) is not finite is
skipped — no update — and training stops only after ``schedule.max_nonfinite_steps`` such steps in
a row. Under ``--amp fp16`` the GradScaler skips steps with inf/NaN gradients and lowers its scale,
as it should; those steps are counted in the log (``skipped``), not treated as errors. Losses stay
on the device between log lines: one host synchronisation per optimizer step (the skip decision).

Learning rate: ``schedule.lr * total_batch / schedule.lr_batch``, linear warm-up by optimizer step,
step decay by epoch (mmcv ``StepLrUpdaterHook`` semantics).

Outputs in the work dir (all written atomically, with the umask's permissions):
``epoch_<e>.pth`` after each epoch, ``iter_<i>.pth`` every ``--save-interval`` steps (the newest
``--keep-checkpoints`` kept) and when ``--max-iters`` stops mid-epoch, ``last_checkpoint`` (name of
the newest), ``config.yaml``, ``train_log.jsonl`` (one JSON line per logged step), ``tf_logs/``
(TensorBoard), ``eval_epoch_<e>/`` (detections, metrics, plots). A checkpoint holds ``state_dict``
in the same key layout as MMTracking's (``detector.*``, ``motion.*``, ``aggregator.*``), so
``viddet test`` / ``viddet demo --checkpoint`` load it directly, plus ``optimizer``, ``scheduler``,
``scaler``, ``rng``, ``epoch``, ``iter`` and ``meta`` {CLASSES, method, backbone, config, epoch,
iter}.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from viddet.config.files import save_config
from viddet.config.training import Config
from viddet.engine.initial_weights import build_train_model, init_plan, initialise, resolve_plan
from viddet.engine.work_dir import (LOG_FILE, check_work_dir, checkpoint_candidates, config_changes,
                                    latest_checkpoint, read_training_checkpoint, remove_stale_temporaries,  # noqa: F401
                                    run_outputs, save_checkpoint, set_rng_state, truncate_log)
from viddet.errors import VidDetError
from viddet.runtime import init_distributed, resolve_device, set_threads, world_info
from viddet.structures import TrainSample


# ===================================================================================== data
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
    (reference sampling and flip) is set to ``random.Random(sample_seed(seed, epoch, index))`` just
    before the item is loaded, and the sample's ``seed`` (anchor/RoI sampling) is derived from the
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
                           is_video_data=bool(item['is_video_data']), seed=s ^ 0x5DEECE66D)


def build_train_set(cfg: Config) -> SeededTrainSet:
    """The concatenated training sets of ``cfg.data.train`` (MMTracking: VID + DET), each checked
    before training starts: categories (:func:`check_categories`) and frame files.

    Raises:
        VidDetError: a set without usable training image, categories that do not fit
            ``model.classes``, or missing / unreadable frame files (naming the first and the count).
    """
    from viddet.data.video_dataset import VideoDataset
    sets = []
    for i, t in enumerate(cfg.data.train):
        ref = None
        if t.ref_sampler is not None and t.ref_sampler.num_ref_imgs > 0:
            r = t.ref_sampler
            ref = dict(num_ref_imgs=r.num_ref_imgs, frame_range=r.frame_range,
                       filter_key_img=r.filter_key_img, method=r.method)
        ds = VideoDataset(t.ann_file, t.img_prefix, load_as_video=t.load_as_video, ref_sampler=ref,
                          classes=cfg.model.classes, min_size=cfg.data.min_size, img_scale=tuple(cfg.data.scale),
                          flip_ratio=cfg.data.flip_ratio)
        where = f'{cfg.source}: data.train.{i} ({t.ann_file})'
        check_categories(ds, cfg.model.classes, where)
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


def _collate(items):
    return list(items)


# ===================================================================================== schedule
@dataclass
class LrSchedule:
    """Linear warm-up by step + step decay by epoch (mmcv ``StepLrUpdaterHook``, ``by_epoch``).

    lr(epoch, it) = base * gamma ** #{s in steps: epoch >= s}, times
    ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)`` while ``it < warmup_iters``
    (``epoch`` 0-based, ``it`` = global optimizer step, 0-based).
    """
    base_lr: float
    steps: Sequence[int]
    gamma: float
    warmup_iters: int
    warmup_ratio: float

    def lr(self, epoch: int, it: int) -> float:
        lr = self.base_lr * self.gamma ** sum(1 for s in self.steps if epoch >= s)
        if it < self.warmup_iters:
            k = (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
            lr = lr * (1 - k)
        return lr

    def state_dict(self) -> dict:
        return dict(type='step_linear_warmup', base_lr=self.base_lr, steps=list(self.steps), gamma=self.gamma,
                    warmup_iters=self.warmup_iters, warmup_ratio=self.warmup_ratio)


# ===================================================================================== distributed
class _TrainForward(nn.Module):
    """Routes ``forward`` to ``forward_train`` so that DDP's gradient hooks fire."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.forward_train(batch)


def grad_scaler(device: torch.device):
    """The fp16 loss scaler: dynamic, starting at 512 (MMTracking's fp16 ``loss_scale``)."""
    return torch.amp.GradScaler(device.type, init_scale=512.0)


# ===================================================================================== evaluation
def evaluate_model(model: nn.Module, cfg: Config, out_dir: Path, device: torch.device,
                   progress: bool = True) -> Optional[dict]:
    """Scores the trained weights on ``cfg.data.val`` exactly as ``viddet test`` would score their
    checkpoint: a fresh model built with the test settings ``cfg.model.test`` gets the trained state
    dict (fast paths on), and :func:`viddet.engine.evaluate.run_test` runs it over the val videos,
    sharded over the processes under DDP (every rank must call this), then rank 0 reports COCO AP50
    and the VID mAP (:func:`viddet.evaluation.report.evaluate_and_report`).

    Returns:
        the metrics dict on rank 0, None on the other ranks or when ``cfg.data.val`` is not set.
    """
    from viddet import speedups
    from viddet.api import VideoDetector
    from viddet.engine.evaluate import run_test
    from viddet.evaluation.report import evaluate_and_report
    v = cfg.data.val
    if v is None:
        return None
    test_model = build_train_model(cfg)
    test_model.load_state_dict(model.state_dict())
    test_model.eval()
    settings = cfg.model.settings(cfg.source)
    if settings.fast:
        speedups.enable(test_model)
    detector = VideoDetector(test_model, cfg.model.classes, device, scale=tuple(cfg.data.scale), test=settings)
    # resume: a resumed training run re-evaluates the same weights; what an interrupted
    # evaluation saved is reused, a finished one just re-scored
    results = run_test(detector, v.ann_file, v.img_prefix, out_dir, mode=v.mode, max_videos=v.max_videos,
                       progress=progress, resume=True)
    if results is None:
        return None
    ann = out_dir / 'annotations_subset.json' if v.max_videos is not None else v.ann_file
    return evaluate_and_report(results, str(ann), motion_iou=v.motion_iou, out_dir=str(out_dir),
                               json_path=str(out_dir / 'metrics.json'))


# ===================================================================================== the loop
@dataclass
class TrainResult:
    """What :func:`train` returns: final step/epoch, last checkpoint and the evaluation metrics."""
    iters: int
    epochs_done: int
    checkpoint: Optional[Path]
    metrics: Optional[dict]
    last_losses: Dict[str, float]


class Trainer:
    """One training run (see the module docstring); ``train(...)`` is ``Trainer(...).run()``.

    Args: those of :func:`train`. After :meth:`setup` the attributes ``model``, ``optimizer``,
    ``scaler`` (None without fp16; a test may replace it), ``it`` (optimizer steps done), ``spe``
    (steps per epoch) and ``end_it`` describe the run.
    """

    def __init__(self, cfg: Config, work_dir, *, resume: bool = False, amp: Optional[str] = None,
                 accumulate: int = 1, max_iters: Optional[int] = None, val_interval: Optional[int] = None,
                 device: str = 'auto', progress: bool = True, evaluate: bool = True, verbose: bool = True,
                 threads: Optional[int] = None, save_interval: Optional[int] = None, keep_checkpoints: int = 2,
                 overwrite: bool = False):
        for name, value, low in (('--accumulate', accumulate, 1), ('--max-iters', max_iters, 1),
                                 ('--save-interval', save_interval, 1), ('--keep-checkpoints', keep_checkpoints, 0)):
            if value is not None and value < low:
                raise VidDetError(f'{name} must be >= {low}, got {value}')
        if amp not in (None, 'bf16', 'fp16'):
            raise VidDetError(f'--amp must be bf16 or fp16, got {amp!r}')
        self.cfg, self.work_dir, self.resume, self.amp = cfg, Path(work_dir), resume, amp
        self.accumulate, self.max_iters, self.device_spec, self.threads = accumulate, max_iters, device, threads
        self.progress, self.do_eval, self.verbose, self.overwrite = progress, evaluate, verbose, overwrite
        self.save_interval, self.keep_checkpoints = save_interval, keep_checkpoints
        self.eval_interval = cfg.eval.interval if val_interval is None else val_interval
        self.rank = world_info()[0]
        self.ready = False

    def say(self, message: str) -> None:
        """Prints a line on rank 0 (when ``verbose``)."""
        if self.verbose and self.rank == 0:
            print(message, flush=True)

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything before the first step, cheapest checks first: options, data and weight files,
        the work dir, the process group, initial weights (downloaded once), training data and
        frames, the resumed state, the model, the work dir's files.

        Raises:
            VidDetError: anything that would make the run fail later or mix two runs.
        """
        plan = self._check_and_connect()
        self._build_data()
        ckpt = self._resume_checkpoint() if self.resume else None
        self._build_model(plan, ckpt)
        self._open_outputs(resumed=ckpt is not None)
        self.ready = True
        c, s = self.cfg, self.cfg.schedule
        self.say(f'training {c.model.method} ({c.model.backbone}) on {len(self.train_set)} samples: {self.world} '
                 f'process(es) x {c.data.samples_per_gpu} sample(s) x {self.accumulate} accumulation = batch '
                 f'{self.total_batch}, lr {self.schedule.base_lr:g}, {self.spe} steps/epoch, {s.epochs} epochs, '
                 f'device {self.device}' + (f', amp {self.amp}' if self.amp else ''))

    def _check_and_connect(self):
        """Files, initial-weights plan, device (``cuda:<LOCAL_RANK>`` under torchrun), work dir, the
        process group; returns the initial-weights plan with local files (None when resuming)."""
        cfg = self.cfg
        cfg.check_paths(need_val=self.do_eval)
        plan = None if self.resume else init_plan(cfg)
        set_threads(self.threads)
        self.device = resolve_device(self.device_spec)
        if self.amp == 'fp16' and self.device.type == 'cpu':
            raise VidDetError('--amp fp16 needs a GPU (CPU autocast supports bf16: use --amp bf16)')
        check_work_dir(self.work_dir, self.resume, self.overwrite)   # every rank, before anything is written
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
        self.dist, self.rank, self.world = init_distributed(self.device)
        if plan is not None:
            plan = self._first_on_rank0(lambda: resolve_plan(plan, self.progress and self.rank == 0))
        return plan

    def _build_data(self) -> None:
        """The training set (categories and frames checked), the val frames, batch and schedule."""
        cfg, s = self.cfg, self.cfg.schedule
        self.train_set = build_train_set(cfg)
        if self.do_eval and cfg.data.val is not None:
            check_frame_files(val_frame_files(cfg), f'{cfg.source}: data.val.img_prefix {cfg.data.val.img_prefix}')
        self.total_batch = self.world * cfg.data.samples_per_gpu * self.accumulate
        base_lr = s.lr * (self.total_batch / s.lr_batch if s.lr_batch else 1.0)
        self.schedule = LrSchedule(base_lr, s.steps, s.gamma, s.warmup_iters, s.warmup_ratio)
        self.spe = steps_per_epoch(len(self.train_set), self.total_batch)
        self.total_steps = self.spe * s.epochs
        self.end_it = self.total_steps if self.max_iters is None else min(self.total_steps, self.max_iters)

    def _build_model(self, plan, ckpt: Optional[dict]) -> None:
        """Model with its initial weights (or the checkpoint's), optimizer, scaler, DDP wrapper,
        and for a resumed run its optimizer / scaler / RNG state and position."""
        s = self.cfg.schedule
        torch.manual_seed(s.seed)
        self.model = build_train_model(self.cfg)
        if ckpt is None:
            initialise(self.model, self.cfg, plan, self.say)
        else:
            self.model.load_state_dict(ckpt['state_dict'])
        self.model.to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=self.schedule.base_lr, momentum=s.momentum,
                                         weight_decay=s.weight_decay)
        self.scaler = grad_scaler(self.device) if self.amp == 'fp16' else None
        self.wrapper: nn.Module = _TrainForward(self.model)
        if self.dist is not None:
            from torch.nn.parallel import DistributedDataParallel
            self.wrapper = DistributedDataParallel(
                self.wrapper, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        self.it, self.start_epoch, self.start_step, self.last_ckpt = 0, 0, 0, None
        if ckpt is not None:
            self._restore(ckpt)

    def _open_outputs(self, resumed: bool) -> None:
        """The work dir's files (rank 0), TensorBoard and the log accumulators."""
        if self.rank == 0:
            self._prepare_work_dir(resumed)
        if self.dist is not None:
            self.dist.barrier()
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides what an interrupted run logged after the checkpoint
            self.writer = SummaryWriter(str(self.work_dir / 'tf_logs'), purge_step=self.it + 1 if resumed else None)
        self._reset_log()
        self.bad_steps: List[int] = []
        self.step_losses: Dict[str, torch.Tensor] = {}
        self.metrics = None

    def _first_on_rank0(self, fn):
        """``fn()`` on local rank 0 first (downloads into the shared cache), then on the others."""
        local_rank = world_info()[1]
        if self.dist is not None and local_rank != 0:
            self.dist.barrier()
        out = fn()
        if self.dist is not None and local_rank == 0:
            self.dist.barrier()
        return out

    def _resume_checkpoint(self) -> dict:
        """The newest intact checkpoint of the work dir (a truncated or unreadable newer one is
        named and passed over), checked against the config.

        Raises:
            VidDetError: no (intact) checkpoint, or one of another method / backbone / classes.
        """
        candidates = checkpoint_candidates(self.work_dir, self.spe)
        if not candidates:
            raise VidDetError(f'--resume: no checkpoint in {self.work_dir}')
        problems = []
        for path in candidates:
            try:
                ckpt = read_training_checkpoint(path)
            except VidDetError as e:
                problems.append(str(e))
                self.say(f'--resume: passing over {e}')
                continue
            if problems:
                self.say(f'--resume: continuing from {path.name}, the newest intact checkpoint')
            self._check_same_model(ckpt, path)
            ckpt['path'] = path
            return ckpt
        raise VidDetError(f'--resume: no intact checkpoint in {self.work_dir}:\n  ' + '\n  '.join(problems))

    def _check_same_model(self, ckpt: dict, path: Path) -> None:
        meta, m = ckpt.get('meta') or {}, self.cfg.model
        was = (meta.get('method'), meta.get('backbone'), list(meta.get('CLASSES') or []))
        now = (m.method, m.backbone, list(m.classes))
        if was != now:
            raise VidDetError(f'--resume: {path} was trained as {was[0]} ({was[1]}, {len(was[2])} classes) but '
                              f'{self.cfg.source} trains {now[0]} ({now[1]}, {len(now[2])} classes): resume with the '
                              f'config it was trained with ({self.work_dir / "config.yaml"}) or give another --work-dir')
        if int(ckpt.get('total_batch', self.total_batch)) != self.total_batch:
            raise VidDetError(f'--resume: {path} was trained with a total batch of {ckpt["total_batch"]} '
                              f'(processes x samples_per_gpu x accumulate), this run has {self.total_batch}; '
                              'resume with the same layout')

    def _restore(self, ckpt: dict) -> None:
        """Optimizer, scaler, RNG states and the position of a resumed run."""
        self.optimizer.load_state_dict(ckpt['optimizer'])
        if self.scaler is not None and ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'])
        self.it, epoch = int(ckpt['iter']), int(ckpt['epoch'])
        self.start_epoch = epoch
        self.start_step = 0 if ckpt.get('epoch_done', True) else min(self.spe, self.it - epoch * self.spe)
        self.resumed_epoch_end = bool(ckpt.get('epoch_done', True))
        self.last_ckpt = ckpt['path']
        self.say(f'resumed from {ckpt["path"]}: epoch {self.start_epoch + 1}, step {self.start_step} of {self.spe}, '
                 f'iteration {self.it}')
        changes = config_changes((ckpt.get('meta') or {}).get('config') or {}, self.cfg.to_dict())
        if changes:
            self.say(f'--resume: the config differs from the one {ckpt["path"].name} was trained with '
                     f'(the new values apply from iteration {self.it + 1} on): ' + '; '.join(changes))

    def _prepare_work_dir(self, resumed: bool) -> None:
        """Rank 0: the work dir, with an overwritten run's outputs deleted, stale temporaries of an
        interrupted save deleted, the log cut back to the resumed iteration, and the config."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            old = run_outputs(self.work_dir)
            for p in old:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if old:
                self.say(f'--overwrite: deleted the earlier run in {self.work_dir} ({len(old)} entries)')
        stale = remove_stale_temporaries(self.work_dir)
        if stale:
            self.say(f'deleted {len(stale)} temporary file(s) of an interrupted save: '
                     f'{", ".join(str(p.relative_to(self.work_dir)) for p in stale[:3])}')
        if resumed:
            removed = truncate_log(self.work_dir / LOG_FILE, self.it)
            if removed:
                self.say(f'{LOG_FILE}: removed {removed} line(s) logged after iteration {self.it} (they are replayed)')
        save_config(self.cfg, self.work_dir / 'config.yaml')

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Trains from the current position to ``end_it`` (setting up first if needed), evaluates
        as configured, and returns the :class:`TrainResult`.

        Raises:
            VidDetError: as :meth:`setup`; a loss that stays non-finite; an item that cannot be loaded.
        """
        if not self.ready:
            self.setup()
        self.loss_scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        try:
            if self.it >= self.end_it:
                self.say(f'the run in {self.work_dir} is already at iteration {self.it} of {self.end_it} ('
                         + ('finished' if self.it >= self.total_steps else '--max-iters') + '): nothing to train; '
                         'raise schedule.epochs (or --max-iters) to train longer')
            elif self.resume and self.resumed_epoch_end and self._eval_due(self.start_epoch):
                self.evaluate(f'eval_epoch_{self.start_epoch}', only_if_missing=True)
            self._train_epochs()
            if self.do_eval and self.cfg.data.val is not None and self.cfg.eval.at_end:
                tag = f'eval_epoch_{self.cfg.schedule.epochs}' if self.it >= self.total_steps else f'eval_iter_{self.it}'
                self.evaluate(tag, only_if_missing=True)
        finally:
            if self.writer is not None:
                self.writer.close()
        last = {k: float(v) for k, v in self.step_losses.items()}
        return TrainResult(self.it, self.it // self.spe, self.last_ckpt, self.metrics, last)

    def _train_epochs(self) -> None:
        from tqdm import tqdm
        bar = tqdm(total=self.end_it, initial=self.it, unit='it', desc=f'train {self.cfg.model.method}',
                   disable=not self.progress or self.rank != 0, dynamic_ncols=True)
        self.bar = bar
        try:
            for epoch in range(self.start_epoch, self.cfg.schedule.epochs):
                if self.it >= self.end_it:
                    break
                first = self.start_step if epoch == self.start_epoch else 0
                batches = self._batches(epoch, first)
                for step in range(first, self.spe):
                    if self.it >= self.end_it:
                        break
                    self.run_step(epoch, step, batches)
                    self.log(epoch)
                    if self.save_interval and self.it % self.save_interval == 0 \
                            and self.it < min(self.end_it, (epoch + 1) * self.spe):
                        self.save_checkpoint(f'iter_{self.it}.pth', epoch, epoch_done=False)
                if self.it == (epoch + 1) * self.spe:   # the epoch is complete
                    self.save_checkpoint(f'epoch_{epoch + 1}.pth', epoch + 1, epoch_done=True)
                    if self._eval_due(epoch + 1):
                        self.evaluate(f'eval_epoch_{epoch + 1}')
                else:   # stopped by --max-iters inside the epoch
                    self.save_checkpoint(f'iter_{self.it}.pth', epoch, epoch_done=False)
                    break
        finally:
            bar.close()

    def _batches(self, epoch: int, first_step: int):
        """An iterator over this rank's micro-batches of the epoch's steps ``first_step..``."""
        spg, acc, tb = self.cfg.data.samples_per_gpu, self.accumulate, self.total_batch
        order = epoch_order(len(self.train_set), self.cfg.schedule.seed, epoch)
        keys = []
        for s in range(first_step, self.spe):
            idx = step_indices(order, s, tb)[self.rank * spg * acc:(self.rank + 1) * spg * acc]
            keys.extend([(epoch, i) for i in idx[j * spg:(j + 1) * spg]] for j in range(acc))
        loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=keys, num_workers=self.cfg.data.workers,
                                             collate_fn=_collate, pin_memory=False)
        return iter(loader)

    def _next_samples(self, batches) -> List[TrainSample]:
        items = next(batches)
        for x in items:
            if isinstance(x, LoadFailure):
                raise VidDetError(f'{self.cfg.source}: a training item cannot be loaded: {x.message}')
        return [x.to(self.device) for x in items]

    def run_step(self, epoch: int, step: int, batches) -> None:
        """One optimizer step: ``accumulate`` micro-batches forward + backward, gradient clipping,
        then the update — or a skipped step when the loss (or gradient) is not finite.

        Raises:
            VidDetError: ``schedule.max_nonfinite_steps`` non-finite steps in a row (naming the
                iterations, the losses and the last good checkpoint).
        """
        from viddet.models.losses import sum_losses
        acc = self.accumulate
        self.lr = self.schedule.lr(epoch, self.it)
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr
        t0 = time.perf_counter()
        losses_sum: Dict[str, torch.Tensor] = {}
        for j in range(acc):
            td = time.perf_counter()
            samples = self._next_samples(batches)
            self.log_data_time += time.perf_counter() - td
            last = self.dist is None or j == acc - 1
            with contextlib.nullcontext() if last else self.wrapper.no_sync():
                with self._autocast():
                    losses = self.wrapper(samples)
                total = sum_losses(losses)
                loss = total / acc
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k, v in list(losses.items()) + [('loss', total)]:   # stays on the device: no host sync
                losses_sum[k] = losses_sum.get(k, 0.0) + v.detach().float() / acc
        grad_norm = self._unscale_and_clip()
        bad = self._nonfinite(losses_sum['loss'], grad_norm)   # the step's one host synchronisation
        updated = self._optimizer_step(bad)
        self.it += 1
        self.step_losses, self.grad_norm = losses_sum, grad_norm
        self.log_time += time.perf_counter() - t0
        self.log_steps += 1
        self.log_skipped += 0 if updated else 1
        if self.rank == 0:
            self.bar.update(1)
        if not bad:
            self.bad_steps = []
            for k, v in losses_sum.items():
                self.log_sums[k] = self.log_sums.get(k, 0.0) + v
            self.log_good += 1
            return
        self.bad_steps.append(self.it)
        if len(self.bad_steps) >= self.cfg.schedule.max_nonfinite_steps:
            self._stop_nonfinite(epoch, step, losses_sum, grad_norm)

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == 'bf16' else torch.float16)

    def _unscale_and_clip(self) -> Optional[torch.Tensor]:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.schedule.grad_clip
        return None if clip is None else torch.nn.utils.clip_grad_norm_(self.params, clip, norm_type=2)

    def _nonfinite(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> bool:
        """Whether the step's loss (or, without a scaler, gradient norm) is not finite on any rank."""
        flag = ~torch.isfinite(loss)
        if self.scaler is None and grad_norm is not None:
            flag = flag | ~torch.isfinite(grad_norm)
        flag = flag.float().reshape(1)
        if self.dist is not None:
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return bool(flag.item())

    def _optimizer_step(self, bad: bool) -> bool:
        """Updates the weights unless ``bad``; under fp16 the scaler may skip the step too (inf/NaN
        gradients; it then lowers its scale). Returns whether the weights were updated."""
        if self.scaler is None:
            if not bad:
                self.optimizer.step()
            updated = not bad
        else:
            if not bad:
                self.scaler.step(self.optimizer)
            self.scaler.update()
            scale = float(self.scaler.get_scale())
            updated = not bad and scale >= self.loss_scale   # the scale drops exactly when a step was skipped
            self.loss_scale = scale
        self.optimizer.zero_grad(set_to_none=True)
        return updated

    def _stop_nonfinite(self, epoch: int, step: int, losses: Dict[str, torch.Tensor], grad_norm) -> None:
        values = {k: float(v) for k, v in losses.items()}
        bad = [f'{k} = {v}' for k, v in values.items() if not math.isfinite(v)]
        if not bad and grad_norm is not None:
            bad = [f'gradient norm = {float(grad_norm)}']
        n = len(self.bad_steps)
        where = f' (last good checkpoint: {self.last_ckpt})' if self.last_ckpt else ' (no checkpoint saved yet)'
        raise VidDetError(f'non-finite loss at iteration {self.it} (epoch {epoch + 1}, step {step + 1}), the last of '
                          f'{n} such steps in a row (iterations {self.bad_steps[0]}-{self.it}, skipped; '
                          f'schedule.max_nonfinite_steps = {self.cfg.schedule.max_nonfinite_steps}): {", ".join(bad)}; '
                          f'training stopped{where}')

    # ------------------------------------------------------------------------------ log, save, evaluate
    def _reset_log(self) -> None:
        self.log_sums: Dict[str, torch.Tensor] = {}
        self.log_good = self.log_steps = self.log_skipped = 0
        self.log_time = self.log_data_time = 0.0
        self.log_start = time.perf_counter()

    def log(self, epoch: int) -> None:
        """Rank 0, every ``schedule.log_interval`` steps and at the end: the interval's mean losses
        (finite steps only), lr, times, gradient norm, skipped steps -> ``train_log.jsonl``,
        TensorBoard and the progress bar (the losses' one host transfer of the interval)."""
        if self.rank != 0 or (self.it % self.cfg.schedule.log_interval and self.it != self.end_it):
            return
        keys = list(self.log_sums)
        values = torch.stack([self.log_sums[k] for k in keys]).tolist() if keys else []
        rec = {k: v / self.log_good for k, v in zip(keys, values)}
        n = max(1, self.log_steps)
        rec.update(iter=self.it, epoch=epoch + 1, lr=self.lr, time=self.log_time / n,
                   data_time=self.log_data_time / n, sec_per_iter=(time.perf_counter() - self.log_start) / n,
                   skipped=self.log_skipped)
        if self.grad_norm is not None:
            rec['grad_norm'] = float(self.grad_norm)
        if self.scaler is not None:
            rec['loss_scale'] = self.loss_scale
        for k, v in rec.items():
            if k not in ('iter', 'epoch'):
                self.writer.add_scalar(('train/' if k.startswith('loss') or k == 'acc' else 'meta/') + k, v, self.it)
        with open(self.work_dir / LOG_FILE, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        if 'loss' in rec:
            self.bar.set_postfix(loss=f'{rec["loss"]:.3f}', lr=f'{self.lr:.2e}', epoch=epoch + 1)
        self._reset_log()

    def save_checkpoint(self, name: str, epoch: int, epoch_done: bool) -> Optional[Path]:
        """Rank 0 writes ``name`` (atomically) and keeps the newest ``keep_checkpoints``
        ``iter_*.pth``; under DDP the epoch-end save is a barrier for all ranks."""
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.work_dir / name, self.model, self.optimizer, self.schedule, self.scaler,
                                   epoch, self.it, self.cfg, epoch_done=epoch_done, total_batch=self.total_batch)
            self.last_ckpt = path
            self._prune_checkpoints()
        if self.dist is not None and epoch_done:
            self.dist.barrier()
        return path

    def _prune_checkpoints(self) -> None:
        if not self.keep_checkpoints:
            return
        iters = [p for p in checkpoint_candidates(self.work_dir, self.spe) if p.name.startswith('iter_')]
        for p in iters[self.keep_checkpoints:]:
            p.unlink()

    def _eval_due(self, epochs_done: int) -> bool:
        """An interval evaluation after ``epochs_done`` epochs (the end has its own)."""
        n = self.eval_interval
        return (self.do_eval and bool(n) and epochs_done % n == 0 and epochs_done != self.cfg.schedule.epochs
                and self.cfg.data.val is not None)

    def evaluate(self, tag: str, only_if_missing: bool = False) -> Optional[dict]:
        """Every rank: the sharded evaluation of the current weights into ``work_dir/tag``
        (:func:`evaluate_model`, the code of ``viddet test``); rank 0 logs the metrics. With
        ``only_if_missing`` an evaluation whose ``metrics.json`` exists is read, not run again."""
        out = self.work_dir / tag
        if only_if_missing and (out / 'metrics.json').is_file():
            if self.rank == 0:
                self.metrics = json.loads((out / 'metrics.json').read_text())
                self.say(f'{tag}: already evaluated ({out / "metrics.json"})')
            return self.metrics
        metrics = evaluate_model(self.model, self.cfg, out, self.device, self.progress)
        self.model.train()
        if metrics is not None:
            self.metrics = metrics
            for k in ('coco_ap50', 'vid_map', 'vid_map_slow', 'vid_map_medium', 'vid_map_fast'):
                if self.writer is not None and metrics.get(k) is not None:
                    self.writer.add_scalar(f'val/{k}', metrics[k], self.it)
        return metrics


def train(cfg: Config, work_dir, *, resume: bool = False, amp: Optional[str] = None, accumulate: int = 1,
          max_iters: Optional[int] = None, val_interval: Optional[int] = None, device: str = 'auto',
          progress: bool = True, evaluate: bool = True, verbose: bool = True, threads: Optional[int] = None,
          save_interval: Optional[int] = None, keep_checkpoints: int = 2, overwrite: bool = False) -> TrainResult:
    """Trains ``cfg`` (see module docstring). Under ``torchrun`` every process calls this.

    Args:
        cfg: a validated :class:`viddet.config.Config`.
        work_dir: checkpoints, logs and evaluations go here; it must not hold another run unless
            ``resume`` or ``overwrite``.
        resume: continue from the work dir's newest intact checkpoint (error if there is none).
        amp: None, ``'bf16'`` or ``'fp16'`` (autocast; fp16 adds a dynamic GradScaler starting at
            512, MMTracking's fp16 loss scale).
        accumulate: micro-batches per optimizer step (a k x larger effective batch).
        max_iters: stop after this many optimizer steps in total (checkpoint ``iter_<n>.pth``).
        val_interval: evaluate every N epochs (overrides ``cfg.eval.interval``; 0 = end only).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` (``cuda``/``auto`` = ``cuda:<LOCAL_RANK>``
            under torchrun).
        progress: tqdm bar (rank 0). evaluate: run the evaluation(s) at all. verbose: messages.
        threads: ``torch.set_num_threads`` for this process (None: torch's default). On a CPU
            shared with other jobs, 1 thread per process avoids OpenMP spin-waiting, which can make
            training 10x slower.
        save_interval: also save ``iter_<n>.pth`` every N optimizer steps (a preempted run loses
            at most N steps).
        keep_checkpoints: keep the newest K ``iter_*.pth`` (0: all); ``epoch_*.pth`` are all kept.
        overwrite: delete an earlier run's outputs in ``work_dir`` first.

    Returns:
        :class:`TrainResult` (``metrics`` only on rank 0).

    Raises:
        VidDetError: missing data/init files and frames (checked before anything is built), a loss
            that stays non-finite (naming the iterations and the losses; the last good checkpoint is
            left intact), a work dir holding another run, a resume without (intact) checkpoint or
            with another model's config, bad arguments.
    """
    return Trainer(cfg, work_dir, resume=resume, amp=amp, accumulate=accumulate, max_iters=max_iters,
                   val_interval=val_interval, device=device, progress=progress, evaluate=evaluate, verbose=verbose,
                   threads=threads, save_interval=save_interval, keep_checkpoints=keep_checkpoints,
                   overwrite=overwrite).run()
