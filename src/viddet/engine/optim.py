"""The optimizer side of ``viddet train``: the learning-rate schedule, the update (SGD, mixed
precision, gradient clipping) and the rule for steps whose loss is not finite.

Learning rate: ``schedule.lr * total_batch / schedule.lr_batch``, linear warm-up by optimizer step,
step decay by epoch (mmcv ``StepLrUpdaterHook`` semantics; :class:`LrSchedule`), or YOLOX's
warm-up + cosine (``schedule.policy: yolox_cos``).

Non-finite values: a step whose loss (or, without a loss scaler, gradient norm) is not finite is
skipped — no update — and training stops only after ``schedule.max_nonfinite_steps`` such steps in
a row (:class:`NonFiniteSteps`). Under ``--amp fp16`` the GradScaler skips steps with inf/NaN
gradients and lowers its scale, as it should; those steps are counted in the log (``skipped``), not
treated as errors. Losses stay on the device: one host synchronisation per optimizer step (the
skip decision, :meth:`Updater.step`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from viddet.config.training import ScheduleConfig
from viddet.errors import VidDetError


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
    policy: str = 'step'
    min_lr_ratio: float = 0.05
    total_iters: int = 0
    final_iters: int = 0

    @classmethod
    def from_config(cls, s: ScheduleConfig, total_batch: int, steps_per_epoch: int = 1) -> 'LrSchedule':
        """``schedule.lr`` scaled linearly to ``total_batch`` (from ``schedule.lr_batch``; unscaled when 0)."""
        base_lr = s.lr * (total_batch / s.lr_batch if s.lr_batch else 1.0)
        return cls(base_lr, s.steps, s.gamma, s.warmup_iters, s.warmup_ratio, s.policy, s.min_lr_ratio,
                   s.epochs * steps_per_epoch, round(s.final_epochs * steps_per_epoch))

    def lr(self, epoch: int, it: int) -> float:
        if self.policy == 'yolox_cos':
            return self.yolox_cos(it)
        lr = self.base_lr * self.gamma ** sum(1 for s in self.steps if epoch >= s)
        if it < self.warmup_iters:
            k = (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
            lr = lr * (1 - k)
        return lr

    def yolox_cos(self, it: int) -> float:
        """YOLOX's ``yolox_warm_cos_lr`` at step ``it``: base · (it / warmup)² during the warm-up,
        then a cosine from base to ``min_lr_ratio`` · base ending ``final_iters`` steps before
        ``total_iters``, then that minimum."""
        low = self.base_lr * self.min_lr_ratio
        if self.warmup_iters and it <= self.warmup_iters:
            return self.base_lr * (it / self.warmup_iters) ** 2
        if it >= self.total_iters - self.final_iters:
            return low
        span = max(self.total_iters - self.warmup_iters - self.final_iters, 1)
        return low + 0.5 * (self.base_lr - low) * (1.0 + math.cos(math.pi * (it - self.warmup_iters) / span))

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, it: int) -> float:
        """Sets every parameter group's lr for step ``it`` of ``epoch``; returns it."""
        lr = self.lr(epoch, it)
        for group in optimizer.param_groups:
            group['lr'] = lr
        return lr

    def state_dict(self) -> dict:
        if self.policy == 'yolox_cos':
            return dict(type='yolox_warm_cos', base_lr=self.base_lr, warmup_iters=self.warmup_iters,
                        min_lr_ratio=self.min_lr_ratio, total_iters=self.total_iters, final_iters=self.final_iters)
        return dict(type='step_linear_warmup', base_lr=self.base_lr, steps=list(self.steps), gamma=self.gamma,
                    warmup_iters=self.warmup_iters, warmup_ratio=self.warmup_ratio)


def grad_scaler(device: torch.device):
    """The fp16 loss scaler: dynamic, starting at 512 (MMTracking's fp16 ``loss_scale``)."""
    return torch.amp.GradScaler(device.type, init_scale=512.0)


class Updater:
    """How the gradients of a step become an update: SGD with momentum and weight decay
    (``schedule.momentum``, ``schedule.weight_decay``) over the trainable parameters, autocast and
    the fp16 loss scaler (``amp``), gradient clipping (``schedule.grad_clip``), no update for a
    non-finite step, and after each update the weight EMA's (``ema``, a
    :class:`viddet.engine.ema.WeightEMA` of ``model``, or None).

    Attributes: ``optimizer``; ``scaler`` (None without fp16; a test may replace it before
    :meth:`start`); ``loss_scale``, the scaler's scale after the last step (1.0 without scaler).
    """

    def __init__(self, model: nn.Module, s: ScheduleConfig, base_lr: float, amp: Optional[str],
                 device: torch.device, dist=None, ema=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = [{'params': self.params}]
        if not s.decay_norm_and_bias:   # YOLOX: decay on conv / linear weights only
            groups = [{'params': [p for p in self.params if p.dim() > 1]},
                      {'params': [p for p in self.params if p.dim() <= 1], 'weight_decay': 0.0}]
        self.optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=s.momentum, weight_decay=s.weight_decay,
                                         nesterov=s.nesterov)
        self.scaler = grad_scaler(device) if amp == 'fp16' else None
        self.amp, self.device, self.clip, self.dist = amp, device, s.grad_clip, dist
        self.model, self.ema = model, ema
        self.loss_scale = 1.0

    def start(self) -> None:
        """Notes the loss scale training starts from (a step whose scale drops was skipped)."""
        self.loss_scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def autocast(self):
        """The forward's autocast context (bf16 or fp16), or none."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == 'bf16' else torch.float16)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled under fp16); the gradients add up until :meth:`step`."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, loss: torch.Tensor) -> Tuple[Optional[torch.Tensor], bool, bool]:
        """Unscales and clips the gradients, decides whether the step is non-finite (``loss``, the
        step's total loss, or the gradient norm, on any rank: the step's one host synchronisation),
        updates the weights unless it is, and clears the gradients.

        Returns:
            (gradient norm or None without clipping, non-finite, whether the weights were updated).
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None if self.clip is None else torch.nn.utils.clip_grad_norm_(self.params, self.clip,
                                                                                   norm_type=2)
        bad = self._nonfinite(loss, grad_norm)
        return grad_norm, bad, self._update(bad)

    def _nonfinite(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> bool:
        """Whether the step's loss (or, without a scaler, gradient norm) is not finite on any rank."""
        flag = ~torch.isfinite(loss)
        if self.scaler is None and grad_norm is not None:
            flag = flag | ~torch.isfinite(grad_norm)
        flag = flag.float().reshape(1)
        if self.dist is not None:
            self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return bool(flag.item())

    def _update(self, bad: bool) -> bool:
        """Updates the weights unless ``bad``; under fp16 the scaler may skip the step too (inf/NaN
        gradients; it then lowers its scale); then the EMA of an updated step. Returns whether the
        weights were updated."""
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
        if updated and self.ema is not None:   # a skipped step changes nothing, the EMA neither
            self.ema.update(self.model)
        return updated


class NonFiniteSteps:
    """Counts the non-finite steps in a row and stops the run at ``limit``
    (``schedule.max_nonfinite_steps``)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak: List[int] = []   # the iterations of the current run of non-finite steps

    def record(self, bad: bool, it: int, epoch: int, step: int, losses: Dict[str, torch.Tensor],
               grad_norm: Optional[torch.Tensor], last_checkpoint: Optional[Path]) -> None:
        """Notes iteration ``it`` (1-based; ``epoch``, ``step`` 0-based) as finite or not.

        Raises:
            VidDetError: the ``limit``-th non-finite step in a row (naming the iterations, the
                losses that are not finite and the last good checkpoint).
        """
        if not bad:
            self.streak = []
            return
        self.streak.append(it)
        if len(self.streak) < self.limit:
            return
        values = {k: float(v) for k, v in losses.items()}
        named = [f'{k} = {v}' for k, v in values.items() if not math.isfinite(v)]
        if not named and grad_norm is not None:
            named = [f'gradient norm = {float(grad_norm)}']
        where = f' (last good checkpoint: {last_checkpoint})' if last_checkpoint else ' (no checkpoint saved yet)'
        raise VidDetError(f'non-finite loss at iteration {it} (epoch {epoch + 1}, step {step + 1}), the last of '
                          f'{len(self.streak)} such steps in a row (iterations {self.streak[0]}-{it}, skipped; '
                          f'schedule.max_nonfinite_steps = {self.limit}): {", ".join(named)}; '
                          f'training stopped{where}')
