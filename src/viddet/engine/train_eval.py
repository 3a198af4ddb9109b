"""Evaluation during ``viddet train`` (detectron2's ``EvalHook``): the trained weights scored on
``data.val`` by the code of ``viddet test``, every ``eval.interval`` epochs (``--val-interval``)
and at the end (``eval.at_end``), into ``eval_epoch_<e>/`` (or ``eval_iter_<i>/`` when
``--max-iters`` stops mid-epoch)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from viddet.config.training import Config
from viddet.engine.initial_weights import build_train_model
from viddet.engine.train_log import TrainLog


def evaluate_model(weights: Dict[str, torch.Tensor], cfg: Config, out_dir: Path, device: torch.device,
                   progress: bool = True) -> Optional[dict]:
    """Scores the trained weights (a ``state_dict``: the model's, or their EMA) on ``cfg.data.val``
    exactly as ``viddet test`` would score their checkpoint: a fresh model built with the test
    settings ``cfg.model.test`` gets them (fast paths on), and
    :func:`viddet.engine.evaluate.run_test` runs it over the val videos, sharded over the processes
    under DDP (every rank must call this), then rank 0 reports COCO AP50 and the VID mAP
    (:func:`viddet.evaluation.report.evaluate_and_report`).

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
    test_model.load_state_dict(weights)
    test_model.eval()
    settings = cfg.model.settings(cfg.source)
    if settings.fast:
        test_model = speedups.convert(test_model)
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


class Evaluation:
    """When the run evaluates, and the newest metrics (``metrics``; rank 0 only).

    Args:
        cfg: the run's config (``data.val``, ``eval.at_end``, ``schedule.epochs``).
        work_dir: where the evaluation folders go.
        enabled: ``evaluate`` of the run's options (False: never).
        interval: every this many epochs (0: at the end only).
        rank, device, progress: this process, its device, whether to show progress.
        log: the run's :class:`~viddet.engine.train_log.TrainLog` (metrics go to TensorBoard).
        say: prints a message on rank 0.
    """

    def __init__(self, cfg: Config, work_dir: Path, enabled: bool, interval: int, rank: int,
                 device: torch.device, progress: bool, log: TrainLog, say: Callable[[str], None]):
        self.cfg, self.work_dir, self.rank, self.device, self.progress = cfg, work_dir, rank, device, progress
        self.enabled = enabled and cfg.data.val is not None
        self.interval, self.log, self.say = interval, log, say
        self.metrics: Optional[dict] = None

    def due(self, epochs_done: int) -> bool:
        """An interval evaluation after ``epochs_done`` epochs (the end has its own)."""
        n = self.interval
        return self.enabled and bool(n) and epochs_done % n == 0 and epochs_done != self.cfg.schedule.epochs

    def due_at_end(self) -> bool:
        """The evaluation when training ends (``eval.at_end``)."""
        return self.enabled and self.cfg.eval.at_end

    def run(self, weights: Dict[str, torch.Tensor], tag: str, it: int, only_if_missing: bool = False) \
            -> Optional[dict]:
        """Every rank: the sharded evaluation of ``weights`` (a ``state_dict``, the same on every
        rank) into ``work_dir/tag`` (:func:`evaluate_model`, the code of ``viddet test``); rank 0
        logs the metrics at step ``it``. With ``only_if_missing`` an evaluation whose
        ``metrics.json`` exists is read, not run again."""
        out = self.work_dir / tag
        if only_if_missing and (out / 'metrics.json').is_file():
            if self.rank == 0:
                self.metrics = json.loads((out / 'metrics.json').read_text())
                self.say(f'{tag}: already evaluated ({out / "metrics.json"})')
            return self.metrics
        metrics = evaluate_model(weights, self.cfg, out, self.device, self.progress)
        if metrics is not None:
            self.metrics = metrics
            self.log.val_metrics(metrics, it)
        return metrics
