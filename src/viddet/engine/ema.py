"""The exponential moving average (EMA) of a model's weights during ``viddet train``
(``schedule.ema_decay``; off by default), with the semantics of YOLOX's ``ModelEMA``
(``yolox/utils/ema.py``, used by YOLOV's trainer ``yolox/core/vid_trainer.py`` with decay 0.9998).

After every optimizer step that updates the weights, ``updates`` grows by one and every
floating-point tensor of the model's ``state_dict`` — parameters, frozen ones included, and the
BatchNorm running mean / variance — becomes ``ema = d * ema + (1 - d) * current`` with
``d = decay * (1 - exp(-updates / ramp))`` (``ramp`` 0: ``d = decay``). The ramp keeps ``d`` small
at first, so early EMA weights follow the trained ones. Integer buffers (BatchNorm's
``num_batches_tracked``) keep the value they had when the EMA was made, as in YOLOX (they matter
only to a BatchNorm without momentum). The EMA tensors are fp32 whatever the autocast (AMP) does
in the forward, on the model's device, and taken from the unwrapped model (not the DDP wrapper).

The trainer evaluates the EMA weights and saves them as a checkpoint's ``state_dict`` (what
``viddet test`` / ``demo`` / ``init.checkpoint`` load; YOLOX saves ``ema.ema`` as ``model``); the
trained weights go beside them as ``train_state_dict`` and the counter as ``ema``, so that
``--resume`` continues both bit-exactly (YOLOX's resume restarts from the EMA weights instead).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from viddet.errors import VidDetError


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy; half / bfloat16 tensors become fp32."""
    t = t.detach()
    return t.float().clone() if t.dtype in (torch.float16, torch.bfloat16) else t.clone()


class WeightEMA:
    """The EMA of ``model``'s ``state_dict`` (see the module docstring).

    Args:
        model: the trained model (unwrapped); the EMA starts as a copy of its current state.
        decay: the decay the ramp approaches, in (0, 1) (YOLOX / YOLOV: 0.9998).
        ramp: updates over which the decay ramps up (e-folding; YOLOX: 2000); 0: no ramp.
        updates: updates already done (a resumed run).

    Attributes: ``decay``, ``ramp``, ``updates``; :meth:`state_dict` gives the EMA tensors.
    """

    def __init__(self, model: nn.Module, decay: float, ramp: float = 2000.0, updates: int = 0):
        self.decay, self.ramp, self.updates = float(decay), float(ramp), int(updates)
        self.state: Dict[str, torch.Tensor] = {k: _fp32_copy(v) for k, v in model.state_dict().items()}

    def rate(self, updates: int) -> float:
        """The decay ``d`` of the ``updates``-th update (1-based)."""
        if not self.ramp:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One update from ``model``'s current state (call after each optimizer step that changed
        the weights): ``ema = d * ema + (1 - d) * current`` on every floating-point tensor."""
        self.updates += 1
        d = self.rate(self.updates)
        current = model.state_dict()
        for k, v in self.state.items():
            if v.dtype.is_floating_point:
                v.mul_(d)
                v.add_((1.0 - d) * current[k].detach().to(v.dtype))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The EMA tensors by ``state_dict`` key (the live tensors: copy before changing them)."""
        return self.state

    def counter(self) -> dict:
        """What a checkpoint keeps beside the tensors: ``{updates, decay, ramp}``."""
        return dict(updates=self.updates, decay=self.decay, ramp=self.ramp)

    def load(self, state: Dict[str, torch.Tensor], updates: int, source: str = 'checkpoint') -> None:
        """Sets the EMA tensors (copied onto this EMA's devices and dtypes) and the update count.

        Raises:
            VidDetError: ``state`` lacks a key of the model or has one more (naming them and ``source``).
        """
        missing, extra = sorted(set(self.state) - set(state)), sorted(set(state) - set(self.state))
        if missing or extra:
            raise VidDetError(f'{source}: EMA weights do not match the model (missing {missing[:3]}, '
                             f'unexpected {extra[:3]})')
        with torch.no_grad():
            for k, v in self.state.items():
                v.copy_(state[k])
        self.updates = int(updates)

    def synced(self, dist=None) -> Dict[str, torch.Tensor]:
        """The EMA tensors, first made equal to rank 0's on every process (a collective: every rank
        calls it). Under DDP each rank's BatchNorm statistics, and so its EMA of them, differ a
        little; rank 0's are the ones its checkpoints save and every rank then evaluates."""
        if dist is not None:
            for v in self.state.values():
                dist.broadcast(v, 0)
        return self.state


def build_ema(model: nn.Module, schedule, ckpt: Optional[dict] = None) -> Optional[WeightEMA]:
    """The run's :class:`WeightEMA` of ``schedule.ema_decay`` and ``schedule.ema_ramp`` (a
    :class:`viddet.config.training.ScheduleConfig`; None when ``ema_decay`` is None: no EMA), made
    from ``model``'s current weights; for a resumed run (``ckpt``, a training checkpoint) the EMA weights and count
    it saved, or, when it was trained without EMA, the EMA starting from its weights with the count
    at its iteration (as YOLOX's resume does).

    Raises:
        VidDetError: the checkpoint's EMA weights do not fit the model.
    """
    if schedule.ema_decay is None:
        return None
    ema = WeightEMA(model, schedule.ema_decay, schedule.ema_ramp)
    if ckpt is not None:
        if ckpt.get('ema'):
            ema.load(ckpt['state_dict'], ckpt['ema']['updates'], str(ckpt.get('path', 'checkpoint')))
        else:
            ema.updates = int(ckpt['iter'])
    return ema


def eval_weights(model: nn.Module, ema: Optional[WeightEMA], dist=None) -> Dict[str, torch.Tensor]:
    """The weights a training run evaluates: ``model``'s ``state_dict``, or with ``ema`` rank 0's
    EMA weights (:meth:`WeightEMA.synced`: every rank must call this)."""
    return model.state_dict() if ema is None else ema.synced(dist)
