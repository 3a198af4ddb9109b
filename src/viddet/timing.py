"""Per-stage wall-clock timing of inference (``viddet benchmark``'s breakdown)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Optional

import torch


class StageTimer:
    """Accumulates wall time per named stage (``backbone``, ``flow``, ``rpn``, ``roi_head``,
    ``aggregation``, ``nms``); a no-op unless enabled.

    Args:
        enabled: measure at all (a disabled timer costs one branch per stage).
        device: the device the timed model runs on. On a CUDA device the timer synchronises *that*
            device around each stage (``torch.cuda.synchronize(device)``), so GPU times are real
            also when the model is not on the current default device (e.g. ``cuda:1``).
    """

    def __init__(self, enabled: bool = False, device: Optional[torch.device] = None):
        self.enabled = enabled
        dev = torch.device(device) if device is not None else None
        self.cuda_device = dev if dev is not None and dev.type == 'cuda' else None
        self.totals: Dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        if not self.enabled:
            yield
            return
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda_device is not None:
                torch.cuda.synchronize(self.cuda_device)
            self.totals[stage] += time.perf_counter() - t0

    def pop(self) -> Dict[str, float]:
        """Returns and resets the accumulated seconds per stage."""
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


NO_TIMER = StageTimer(False)
"""A disabled timer, the default wherever timing is optional."""
