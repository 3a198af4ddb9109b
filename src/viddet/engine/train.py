"""``viddet train``: the training loop for every method, one process or many (torchrun, DDP).

Recipe: MMTracking's ImageNet VID training, one key frame per sample, the losses of the method's
``forward_train`` (see :mod:`viddet.methods`); initial weights as MMTracking's configs give them
(:mod:`viddet.engine.initial_weights`).

The loop is a :class:`Trainer` (``train(...)`` is ``Trainer(...).run()``): :meth:`Trainer.setup`
(checks, data, model and its initial weights or the resumed state, work dir), then per optimizer
step :meth:`Trainer.run_step`, and around it components with their own state, as detectron2's
trainer has hooks:

* the data: :class:`viddet.engine.train_set.TrainLoader` (each sample a pure function of
  ``(seed, epoch, index)``, whatever the processes, workers or interruptions);
* the update and the LR schedule: :mod:`viddet.engine.optim` (SGD, warm-up + step decay, mixed
  precision, gradient clipping, the skip of non-finite steps, the weight EMA: :mod:`viddet.engine.ema`);
* checkpoints and ``--resume``: :class:`viddet.engine.checkpointer.Checkpointer` (bit-exact
  resume, also after a kill);
* the log: :class:`viddet.engine.train_log.TrainLog` (``train_log.jsonl``, TensorBoard, progress bar);
* evaluation: :class:`viddet.engine.train_eval.Evaluation` (the code of ``viddet test``).

The trainer calls only the method's training contract: the model of
:func:`~viddet.engine.initial_weights.build_train_model` with its initial weights
(:func:`~viddet.engine.initial_weights.initialise`), ``model.forward_train(samples)`` returning named
scalar losses (the total is :func:`viddet.models.losses.sum_losses`), ``state_dict`` /
``load_state_dict``.

Outputs in the work dir (all written atomically, with the umask's permissions):
``epoch_<e>.pth`` after each epoch, ``iter_<i>.pth`` every ``--save-interval`` steps (the newest
``--keep-checkpoints`` kept) and when ``--max-iters`` stops mid-epoch, ``last_checkpoint`` (name of
the newest), ``config.yaml``, ``train_log.jsonl`` (one JSON line per logged step), ``tf_logs/``
(TensorBoard), ``eval_epoch_<e>/`` (detections, metrics, plots). A checkpoint holds ``state_dict``
in the same key layout as MMTracking's (``detector.*``, ``motion.*``, ``aggregator.*``), so
``viddet test`` / ``viddet demo --checkpoint`` load it directly (with an EMA: its weights, the
trained ones in ``train_state_dict``), plus ``ema``, ``optimizer``, ``scheduler``, ``scaler``,
``rng``, ``epoch``, ``iter`` and ``meta`` {CLASSES, method, backbone, config, epoch, iter}.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from viddet.config.training import Config
from viddet.engine.checkpointer import Checkpointer, Position
from viddet.engine.ema import build_ema, eval_weights
from viddet.engine.initial_weights import build_train_model, init_plan, initialise, resolve_plan
from viddet.engine.optim import LrSchedule, NonFiniteSteps, Updater
from viddet.engine.train_eval import Evaluation
from viddet.engine.train_log import TrainLog
from viddet.engine.train_options import TrainOptions
from viddet.engine.train_set import TrainLoader, build_train_set, check_frame_files, val_frame_files
from viddet.engine.work_dir import WRITE_ERRORS, check_work_dir, prepare_work_dir
from viddet.errors import VidDetError
from viddet.interrupts import Interrupted, clear_pending, deferred, handle_interrupts, pending, signal_of
from viddet.locks import output_lock
from viddet.runtime import init_distributed, resolve_device, set_threads, world_info
from viddet.structures import TrainSample


@dataclass
class TrainResult:
    """What :func:`train` returns: final step/epoch, last checkpoint and the evaluation metrics."""
    iters: int
    epochs_done: int
    checkpoint: Optional[Path]
    metrics: Optional[dict]
    last_losses: Dict[str, float]


class _TrainForward(nn.Module):
    """Routes ``forward`` to ``forward_train`` so that DDP's gradient hooks fire."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.forward_train(batch)


class Trainer:
    """One training run (see the module docstring); ``train(...)`` is ``Trainer(...).run()``.

    Args:
        cfg: a validated :class:`viddet.config.training.Config`.
        work_dir: checkpoints, logs and evaluations go here.
        options: :class:`TrainOptions` (default: all defaults).

    After :meth:`setup` the attributes ``model``, ``ema`` (None without), ``updater`` (its ``scaler``
    is None without fp16; a test may replace it), ``it`` (optimizer steps done), ``spe`` (steps per
    epoch) and ``end_it`` describe the run.
    """

    def __init__(self, cfg: Config, work_dir, options: Optional[TrainOptions] = None):
        self.cfg, self.work_dir, self.options = cfg, Path(work_dir), options or TrainOptions()
        self.rank = world_info()[0]
        self.ready = False
        self.lock = contextlib.ExitStack()   # the work dir's lock (rank 0), from setup to the end of run

    def say(self, message: str) -> None:
        """Prints a line on rank 0 (when ``verbose``)."""
        if self.options.verbose and self.rank == 0:
            print(message, flush=True)

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything before the first step, cheapest checks first: options, data and weight files,
        the work dir, the process group, initial weights (downloaded once), training data and
        frames, the resumed state, the model, the work dir's files.

        Raises:
            VidDetError: anything that would make the run fail later or mix two runs (another run
                holding the work dir's lock included).
        """
        try:
            plan = self._check_and_connect()
            self._build_data()
            ckpt = self.checkpoints.find() if self.options.resume else None
            self._build_model(plan, ckpt)
            self._open_outputs(resumed=ckpt is not None)
        except BaseException:
            self.lock.close()
            raise
        self.ready = True
        c, o = self.cfg, self.options
        self.say(f'training {c.model.method} ({c.model.backbone}) on {len(self.loader.train_set)} samples: '
                 f'{self.world} process(es) x {c.data.samples_per_gpu} sample(s) x {o.accumulate} accumulation = '
                 f'batch {self.loader.total_batch}, lr {self.schedule.base_lr:g}, {self.spe} steps/epoch, '
                 f'{c.schedule.epochs} epochs, device {self.device}' + (f', amp {o.amp}' if o.amp else ''))

    def _check_and_connect(self):
        """Files, initial-weights plan, device (``cuda:<LOCAL_RANK>`` under torchrun), work dir, the
        process group; returns the initial-weights plan with local files (None when resuming)."""
        cfg, o = self.cfg, self.options
        cfg.check_paths(need_val=o.evaluate)
        plan = None if o.resume else init_plan(cfg)
        set_threads(o.threads)
        self.device = resolve_device(o.device)
        if o.amp == 'fp16' and self.device.type == 'cpu':
            raise VidDetError('--amp fp16 needs a GPU (CPU autocast supports bf16: use --amp bf16)')
        if self.rank == 0:   # one run per work dir: a second is refused, naming the first
            self.lock.enter_context(output_lock(self.work_dir, f'--work-dir {self.work_dir}', is_dir=True))
        check_work_dir(self.work_dir, o.resume, o.overwrite)   # every rank, before anything is written
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
        self.dist, self.rank, self.world = init_distributed(self.device)
        if plan is not None:
            plan = self._first_on_rank0(lambda: resolve_plan(plan, o.progress and self.rank == 0))
        return plan

    def _build_data(self) -> None:
        """The training set (categories and frames checked), the val frames, the batch layout,
        the schedule and the components that need them."""
        cfg, o = self.cfg, self.options
        train_set = build_train_set(cfg, self.say)
        if o.evaluate and cfg.data.val is not None:
            check_frame_files(val_frame_files(cfg), f'{cfg.source}: data.val.img_prefix {cfg.data.val.img_prefix}')
        self.loader = TrainLoader(train_set, cfg, self.rank, self.world, o.accumulate, self.device)
        self.schedule = LrSchedule.from_config(cfg.schedule, self.loader.total_batch, self.loader.steps_per_epoch)
        self.spe = self.loader.steps_per_epoch
        self.total_steps = self.spe * cfg.schedule.epochs
        self.end_it = self.total_steps if o.max_iters is None else min(self.total_steps, o.max_iters)
        self.checkpoints = Checkpointer(self.work_dir, cfg, self.rank, self.dist, self.loader.total_batch, self.spe,
                                        self.end_it, o.save_interval, o.keep_checkpoints, self.say)
        self.log = TrainLog(self.work_dir, self.rank, cfg.schedule.log_interval, self.end_it)
        interval = cfg.eval.interval if o.val_interval is None else o.val_interval
        self.evaluation = Evaluation(cfg, self.work_dir, o.evaluate, interval, self.rank, self.device, o.progress,
                                     self.log, self.say)
        self.nonfinite = NonFiniteSteps(cfg.schedule.max_nonfinite_steps)

    def _build_model(self, plan, ckpt: Optional[dict]) -> None:
        """Model with its initial weights (or the checkpoint's), weight EMA, updater (optimizer, scaler),
        DDP wrapper, and for a resumed run its optimizer / scaler / RNG state and position."""
        torch.manual_seed(self.cfg.schedule.seed)
        self.model = build_train_model(self.cfg)
        if ckpt is None:
            initialise(self.model, self.cfg, plan, self.say)
        else:
            self.model.load_state_dict(ckpt.get('train_state_dict', ckpt['state_dict']))   # not the EMA
        self.model.to(self.device).train()
        self.ema = build_ema(self.model, self.cfg.schedule, ckpt)   # None without schedule.ema_decay
        self.updater = Updater(self.model, self.cfg.schedule, self.schedule.base_lr, self.options.amp, self.device,
                               self.dist, self.ema)
        self.wrapper: nn.Module = _TrainForward(self.model)
        if self.dist is not None:
            from torch.nn.parallel import DistributedDataParallel
            self.wrapper = DistributedDataParallel(
                self.wrapper, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        self.start = Position()
        if ckpt is not None:
            self.start = self.checkpoints.restore(ckpt, self.updater.optimizer, self.updater.scaler)
        self.it = self.start.it

    def _open_outputs(self, resumed: bool) -> None:
        """The work dir's files (rank 0), then TensorBoard."""
        if self.rank == 0:
            prepare_work_dir(self.work_dir, self.cfg, self.options.overwrite, self.it if resumed else None, self.say)
        if self.dist is not None:
            self.dist.barrier()
        self.log.open(self.it, resumed)
        self.step_losses: Dict[str, torch.Tensor] = {}

    def _first_on_rank0(self, fn):
        """``fn()`` on local rank 0 first (downloads into the shared cache), then on the others."""
        local_rank = world_info()[1]
        if self.dist is not None and local_rank != 0:
            self.dist.barrier()
        out = fn()
        if self.dist is not None and local_rank == 0:
            self.dist.barrier()
        return out

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Trains from the current position to ``end_it`` (setting up first if needed), evaluates
        as configured, and returns the :class:`TrainResult`.

        SIGINT and SIGTERM (:mod:`viddet.interrupts`) let the current step finish, save
        ``iter_<i>.pth`` and raise :class:`~viddet.interrupts.Interrupted` saying how to resume.

        Raises:
            VidDetError: as :meth:`setup`; a loss that stays non-finite; an item that cannot be loaded;
                a write that fails (a full disk: naming the file and the checkpoint kept).
            Interrupted: SIGINT / SIGTERM, after the checkpoint is saved.
        """
        clear_pending()
        with handle_interrupts():
            try:
                if not self.ready:
                    self.setup()
                self._run()
            except KeyboardInterrupt as e:
                raise Interrupted(signal_of(e), self._kept(f'interrupted ({signal.Signals(signal_of(e)).name})')) \
                    from None
            except OSError as e:   # a full disk, a quota, a read-only or lost file system
                if e.errno not in WRITE_ERRORS:
                    raise
                from viddet.data.output_paths import os_error_reason
                raise VidDetError(self._kept(f'cannot write {e.filename or "in " + str(self.work_dir)}: '
                                             f'{os_error_reason(e)}')) from None
            finally:
                self.lock.close()
        last = {k: float(v) for k, v in self.step_losses.items()}
        return TrainResult(self.it, self.it // self.spe, self.checkpoints.last, self.evaluation.metrics, last)

    def _kept(self, what: str) -> str:
        """``what`` stopped the run, then what the work dir keeps and how to continue from it."""
        if not hasattr(self, 'checkpoints'):
            return f'{what}; no checkpoint was saved'
        return self.checkpoints.stopped(what + (f' at iteration {self.it}' if self.ready else ''))

    def _run(self) -> None:
        self.updater.start()
        try:
            if self.it >= self.end_it:
                self.say(f'the run in {self.work_dir} is already at iteration {self.it} of {self.end_it} ('
                         + ('finished' if self.it >= self.total_steps else '--max-iters') + '): nothing to train; '
                         'raise schedule.epochs (or --max-iters) to train longer')
            elif self.start.after_epoch and self.evaluation.due(self.start.epoch):
                self.evaluate(f'eval_epoch_{self.start.epoch}', only_if_missing=True)
            self._train_epochs()
            if self.evaluation.due_at_end():
                tag = f'eval_epoch_{self.cfg.schedule.epochs}' if self.it >= self.total_steps else f'eval_iter_{self.it}'
                self.evaluate(tag, only_if_missing=True)
        finally:
            self.log.close()

    def _train_epochs(self) -> None:
        """The epochs from the current position; a SIGINT / SIGTERM lets the step in progress
        finish and be saved (:meth:`_stop_if_signalled`), except during an evaluation."""
        self.log.start_bar(self.it, f'train {self.cfg.model.method}', self.options.progress)
        try:
            with deferred():
                for epoch in range(self.start.epoch, self.cfg.schedule.epochs):
                    if self.it >= self.end_it:
                        break
                    first = self.start.step if epoch == self.start.epoch else 0
                    batches = self.loader.micro_batches(epoch, first)
                    for step in range(first, self.spe):
                        if self.it >= self.end_it:
                            break
                        self.run_step(epoch, step, batches)
                        if self.checkpoints.due(self.it, epoch):
                            self.save_checkpoint(f'iter_{self.it}.pth', epoch, epoch_done=False)
                        if self.it < min(self.end_it, (epoch + 1) * self.spe):
                            self._stop_if_signalled(epoch)
                    if self.it == (epoch + 1) * self.spe:   # the epoch is complete
                        self.save_checkpoint(f'epoch_{epoch + 1}.pth', epoch + 1, epoch_done=True)
                    else:   # stopped by --max-iters inside the epoch
                        self.save_checkpoint(f'iter_{self.it}.pth', epoch, epoch_done=False)
                    self._stop_if_signalled(None)
                    if self.it < (epoch + 1) * self.spe:
                        break
                    if self.evaluation.due(epoch + 1):
                        with deferred(False):
                            self.evaluate(f'eval_epoch_{epoch + 1}')
                self._stop_if_signalled(None)
        finally:
            self.log.close_bar()

    def _stop_if_signalled(self, epoch: Optional[int]) -> None:
        """After a step: when SIGINT / SIGTERM came during it (on any rank), saves ``iter_<it>.pth``
        (``epoch`` in progress; None: just saved) and raises
        :class:`~viddet.interrupts.Interrupted`."""
        signum = pending() or 0
        if self.dist is not None:   # every rank stops after the same step
            flag = torch.tensor([signum], device=self.device)
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
            signum = int(flag.item())
        if not signum:
            return
        clear_pending()
        last = self.checkpoints.last
        if epoch is not None and (last is None or last.name != f'iter_{self.it}.pth'):
            self.save_checkpoint(f'iter_{self.it}.pth', epoch, epoch_done=False)
        raise Interrupted(signum)

    def run_step(self, epoch: int, step: int, batches: Iterator[List[TrainSample]]) -> None:
        """One optimizer step (``step`` of the 0-based ``epoch``): the lr, ``accumulate``
        micro-batches forward + backward, the update (none when the loss or gradient is not
        finite), then the log (a line at its interval).

        Raises:
            VidDetError: ``schedule.max_nonfinite_steps`` non-finite steps in a row (naming the
                iterations, the losses and the last good checkpoint).
        """
        lr = self.schedule.apply(self.updater.optimizer, epoch, self.it)
        t0 = time.perf_counter()
        losses = self._forward_backward(batches)
        grad_norm, bad, updated = self.updater.step(losses['loss'])
        self.it += 1
        self.step_losses = losses
        self.log.add_step(losses, bad, updated, time.perf_counter() - t0)
        self.nonfinite.record(bad, self.it, epoch, step, losses, grad_norm, self.checkpoints.last)
        scale = self.updater.loss_scale if self.updater.scaler is not None else None
        self.log.write(self.it, epoch, lr, grad_norm, scale)

    def _forward_backward(self, batches: Iterator[List[TrainSample]]) -> Dict[str, torch.Tensor]:
        """``accumulate`` micro-batches through ``model.forward_train`` and backward (DDP syncs the
        gradients on the last); returns the step's losses and their total ``loss``, each the mean
        over the micro-batches, on the device (no host synchronisation)."""
        from viddet.models.losses import sum_losses
        acc = self.options.accumulate
        sums: Dict[str, torch.Tensor] = {}
        for j in range(acc):
            td = time.perf_counter()
            samples = next(batches)
            self.log.add_data_time(time.perf_counter() - td)
            last = self.dist is None or j == acc - 1
            with contextlib.nullcontext() if last else self.wrapper.no_sync():
                with self.updater.autocast():
                    losses = self.wrapper(samples)
                total = sum_losses(losses)
                self.updater.backward(total / acc)
            for k, v in list(losses.items()) + [('loss', total)]:
                sums[k] = sums.get(k, 0.0) + v.detach().float() / acc
        return sums

    # ------------------------------------------------------------------------------ save, evaluate
    def save_checkpoint(self, name: str, epoch: int, epoch_done: bool) -> Optional[Path]:
        """Saves the run's state at its current iteration as ``name`` (see
        :meth:`viddet.engine.checkpointer.Checkpointer.save`)."""
        u = self.updater
        return self.checkpoints.save(name, self.model, u.optimizer, self.schedule, u.scaler, epoch, self.it,
                                     epoch_done, self.ema)

    def evaluate(self, tag: str, only_if_missing: bool = False) -> Optional[dict]:
        """Every rank: the evaluation of the current weights (rank 0's EMA with one) into ``work_dir/tag``
        (:meth:`viddet.engine.train_eval.Evaluation.run`)."""
        return self.evaluation.run(eval_weights(self.model, self.ema, self.dist), tag, self.it, only_if_missing)


def train(cfg: Config, work_dir, options: Optional[TrainOptions] = None, **kwargs) -> TrainResult:
    """Trains ``cfg`` (see module docstring). Under ``torchrun`` every process calls this.

    Args:
        cfg: a validated :class:`viddet.config.training.Config`.
        work_dir: checkpoints, logs and evaluations go here; it must not hold another run unless
            ``resume`` or ``overwrite``.
        options: :class:`TrainOptions`; keyword arguments set its fields (``train(cfg, w,
            max_iters=4)`` is ``train(cfg, w, TrainOptions(max_iters=4))``).

    Returns:
        :class:`TrainResult` (``metrics`` only on rank 0).

    Raises:
        VidDetError: missing data/init files and frames (checked before anything is built), a loss
            that stays non-finite (naming the iterations and the losses; the last good checkpoint is
            left intact), a work dir holding another run, a resume without (intact) checkpoint or
            with another model's config, bad options.
    """
    return Trainer(cfg, work_dir, dataclasses.replace(options or TrainOptions(), **kwargs)).run()
