"""What ``viddet train`` reports while it runs (rank 0): one JSON line per logged step in
``train_log.jsonl``, the same values in TensorBoard (``tf_logs/``, with the evaluations' metrics),
and the progress bar.

A log line holds the interval's mean losses (over its finite steps only), ``iter``, ``epoch``,
``lr``, ``time`` / ``data_time`` / ``sec_per_iter`` (seconds per step), ``skipped`` (steps without
update), ``grad_norm`` (with gradient clipping) and ``loss_scale`` (under fp16).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from viddet.engine.work_dir import LOG_FILE

VAL_METRICS = ('coco_ap50', 'vid_map', 'vid_map_slow', 'vid_map_medium', 'vid_map_fast')
"""The evaluation metrics logged to TensorBoard (``val/<name>``)."""


class TrainLog:
    """The run's log: the interval's accumulators, the JSONL file, TensorBoard and the progress bar.

    Args:
        work_dir: the run's work dir.
        rank: this process (only rank 0 writes anything).
        interval: ``schedule.log_interval`` (optimizer steps).
        end_it: the run's last step (always logged; the progress bar's total).
    """

    def __init__(self, work_dir: Path, rank: int, interval: int, end_it: int):
        self.work_dir, self.rank, self.interval, self.end_it = work_dir, rank, interval, end_it
        self.writer = self.bar = None
        self._reset()

    def open(self, it: int, resumed: bool) -> None:
        """Rank 0: TensorBoard's writer, for a run at iteration ``it``; a resumed run hides what an
        interrupted one logged after its checkpoint (``purge_step``)."""
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.work_dir / 'tf_logs'), purge_step=it + 1 if resumed else None)
        self._reset()

    def start_bar(self, it: int, desc: str, enabled: bool) -> None:
        """The progress bar from step ``it`` to ``end_it`` (shown on rank 0 when ``enabled``)."""
        from tqdm import tqdm
        self.bar = tqdm(total=self.end_it, initial=it, unit='it', desc=desc, disable=not enabled or self.rank != 0,
                        dynamic_ncols=True)

    def close_bar(self) -> None:
        self.bar.close()

    def close(self) -> None:
        """Closes TensorBoard's writer (the files are complete)."""
        if self.writer is not None:
            self.writer.close()

    def _reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.good = self.steps = self.skipped = 0
        self.seconds = self.data_seconds = 0.0
        self.start = time.perf_counter()

    def add_data_time(self, seconds: float) -> None:
        """Time spent waiting for a micro-batch."""
        self.data_seconds += seconds

    def add_step(self, losses: Dict[str, torch.Tensor], bad: bool, updated: bool, seconds: float) -> None:
        """One optimizer step: its losses (device tensors, summed unless ``bad``), whether the
        weights were updated, its time; advances the bar."""
        self.seconds += seconds
        self.steps += 1
        self.skipped += 0 if updated else 1
        if self.rank == 0:
            self.bar.update(1)
        if not bad:
            for k, v in losses.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.good += 1

    def write(self, it: int, epoch: int, lr: float, grad_norm: Optional[torch.Tensor],
              loss_scale: Optional[float]) -> None:
        """Rank 0, every ``interval`` steps and at ``end_it``: the interval's line (the losses' one
        host transfer of the interval) -> ``train_log.jsonl``, TensorBoard and the progress bar."""
        if self.rank != 0 or (it % self.interval and it != self.end_it):
            return
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).tolist() if keys else []
        rec = {k: v / self.good for k, v in zip(keys, values)}
        n = max(1, self.steps)
        rec.update(iter=it, epoch=epoch + 1, lr=lr, time=self.seconds / n, data_time=self.data_seconds / n,
                   sec_per_iter=(time.perf_counter() - self.start) / n, skipped=self.skipped)
        if grad_norm is not None:
            rec['grad_norm'] = float(grad_norm)
        if loss_scale is not None:
            rec['loss_scale'] = loss_scale
        for k, v in rec.items():
            if k not in ('iter', 'epoch'):
                self.writer.add_scalar(('train/' if k.startswith('loss') or k == 'acc' else 'meta/') + k, v, it)
        with open(self.work_dir / LOG_FILE, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        if 'loss' in rec:
            self.bar.set_postfix(loss=f'{rec["loss"]:.3f}', lr=f'{lr:.2e}', epoch=epoch + 1)
        self._reset()

    def val_metrics(self, metrics: dict, it: int) -> None:
        """An evaluation's metrics (:data:`VAL_METRICS`) to TensorBoard at step ``it``."""
        for k in VAL_METRICS:
            if self.writer is not None and metrics.get(k) is not None:
                self.writer.add_scalar(f'val/{k}', metrics[k], it)
