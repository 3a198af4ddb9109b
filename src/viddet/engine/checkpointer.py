"""Checkpointing during ``viddet train`` (detectron2's ``Checkpointer`` + ``PeriodicCheckpointer``):
when to save, the newest ``--keep-checkpoints`` ``iter_*.pth`` kept, and ``--resume``: the newest
intact checkpoint of the work dir, checked to be of the same model and batch, restored bit-exactly.

``--resume`` restores model, optimizer, grad scaler, weight EMA, RNG states and the position, and
the trainer skips the steps already done in the epoch: the continued run is bit-identical to an
uninterrupted one (on CPU; cuDNN kernels may add GPU non-determinism), also after a kill (SIGKILL,
a preempted machine) at any point: checkpoints are written atomically, and ``--save-interval``
bounds what is lost. The file format is :func:`viddet.engine.work_dir.save_checkpoint`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from viddet.config.training import Config
from viddet.engine.work_dir import (checkpoint_candidates, config_changes, read_training_checkpoint,
                                    remove_stale_temporaries, save_checkpoint, set_rng_state)
from viddet.errors import VidDetError


@dataclass
class Position:
    """Where a run starts: ``it`` optimizer steps done, the 0-based ``epoch`` and its first ``step``;
    ``after_epoch``: resumed from the checkpoint of an epoch's end."""
    it: int = 0
    epoch: int = 0
    step: int = 0
    after_epoch: bool = False


class Checkpointer:
    """A run's checkpoints in its work dir.

    Args:
        work_dir: the run's work dir.
        cfg: the run's config (stored in every checkpoint; its model is what a resumed one must be).
        rank, dist: this process and the process group (None: one process); rank 0 writes.
        total_batch: processes x samples_per_gpu x accumulate (a resumed run must have the same).
        steps_per_epoch, end_it: optimizer steps per epoch, and the step the run stops at.
        interval: ``--save-interval`` (None: only at epoch ends and where ``--max-iters`` stops).
        keep: ``--keep-checkpoints`` (0: keep every ``iter_*.pth``).
        say: prints a message on rank 0.

    ``last`` is the newest checkpoint written or resumed from (None before).
    """

    def __init__(self, work_dir: Path, cfg: Config, rank: int, dist, total_batch: int, steps_per_epoch: int,
                 end_it: int, interval: Optional[int], keep: int, say: Callable[[str], None]):
        self.work_dir, self.cfg, self.rank, self.dist = work_dir, cfg, rank, dist
        self.total_batch, self.spe, self.end_it = total_batch, steps_per_epoch, end_it
        self.interval, self.keep, self.say = interval, keep, say
        self.last: Optional[Path] = None

    def due(self, it: int, epoch: int) -> bool:
        """An ``iter_<it>.pth`` after step ``it`` of (0-based) ``epoch``: every ``interval`` steps,
        except where the epoch's end or the run's end saves anyway."""
        return bool(self.interval) and it % self.interval == 0 and it < min(self.end_it, (epoch + 1) * self.spe)

    def save(self, name: str, model: nn.Module, optimizer, schedule, scaler, epoch: int, it: int,
             epoch_done: bool, ema=None) -> Optional[Path]:
        """Rank 0 writes ``name`` (atomically; ``epoch`` = epochs completed when ``epoch_done``,
        else the 0-based epoch in progress; ``ema``: the run's :class:`~viddet.engine.ema.WeightEMA`,
        whose weights become the checkpoint's ``state_dict``) and keeps the newest ``keep``
        ``iter_*.pth``; under DDP the epoch-end save is a barrier for all ranks."""
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.work_dir / name, model, optimizer, schedule, scaler, epoch, it, self.cfg,
                                   epoch_done=epoch_done, total_batch=self.total_batch, ema=ema)
            self.last = path
            self._prune()
        if self.dist is not None and epoch_done:
            self.dist.barrier()
        return path

    def stopped(self, what: str) -> str:
        """A message: ``what`` stopped the run, the newest checkpoint kept (:attr:`last`) and the
        command that continues from it."""
        if self.last is None:
            return f'{what}; no checkpoint was saved in {self.work_dir}'
        return (f'{what}; kept {self.last}: continue with\n  viddet train {self.cfg.source} --work-dir '
                f'{self.work_dir} --resume')

    def _prune(self) -> None:
        if not self.keep:
            return
        iters = [p for p in checkpoint_candidates(self.work_dir, self.spe) if p.name.startswith('iter_')]
        for p in iters[self.keep:]:
            p.unlink()

    def find(self) -> dict:
        """The newest intact checkpoint of the work dir (a truncated or unreadable newer one is
        named and passed over), checked against the config; its path is added as ``path``.

        Raises:
            VidDetError: no (intact) checkpoint, or one of another method / backbone / classes /
                total batch.
        """
        candidates = checkpoint_candidates(self.work_dir, self.spe)
        if not candidates:
            stale = remove_stale_temporaries(self.work_dir) if self.rank == 0 and self.work_dir.is_dir() else []
            why = (f' (the run was stopped while it saved its first one; deleted the unfinished file(s) '
                   f'{", ".join(p.name for p in stale[:3])})' if stale else '')
            raise VidDetError(f'--resume: no checkpoint in {self.work_dir}{why}: nothing to continue from; start the '
                              f'run afresh there with --overwrite (deletes its logs and config), or give another '
                              f'--work-dir')
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

    def restore(self, ckpt: dict, optimizer, scaler) -> Position:
        """Optimizer, scaler and RNG states of a checkpoint of :meth:`find` (the model's weights
        are loaded by the caller); says where the run continues and what the config changed.
        Returns the position to continue from."""
        optimizer.load_state_dict(ckpt['optimizer'])
        if scaler is not None and ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'])
        it, epoch, after_epoch = int(ckpt['iter']), int(ckpt['epoch']), bool(ckpt.get('epoch_done', True))
        start = Position(it, epoch, 0 if after_epoch else min(self.spe, it - epoch * self.spe), after_epoch)
        self.last = ckpt['path']
        self.say(f'resumed from {ckpt["path"]}: epoch {start.epoch + 1}, step {start.step} of {self.spe}, '
                 f'iteration {it}')
        changes = config_changes((ckpt.get('meta') or {}).get('config') or {}, self.cfg.to_dict())
        if changes:
            self.say(f'--resume: the config differs from the one {ckpt["path"].name} was trained with '
                     f'(the new values apply from iteration {it + 1} on): ' + '; '.join(changes))
        return start
