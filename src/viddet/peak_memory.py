"""Peak memory over a block of code, for ``viddet benchmark`` (:class:`PeakMemory`).

On CUDA ``torch.cuda.max_memory_allocated`` over the block (weights included). On the CPU the peak
resident set size of the process during the block minus its resident size just before it (so the
weights, loaded before, are excluded): the kernel's high-water mark ``VmHWM`` of
``/proc/self/status`` is reset through ``/proc/self/clear_refs`` before the block, or, where that is
not allowed, ``VmRSS`` is sampled every 2 ms by a thread. (Python's ``tracemalloc`` does not see
torch's allocations.) It covers everything the process allocates while running: activations,
caches, buffered frames. Free memory the C allocator still holds is returned to the OS first (glibc
``malloc_trim``), so the baseline holds only live data; memory the allocator keeps *during* the
block counts as used.
"""
from __future__ import annotations

import re
import threading
from typing import Optional

import torch

__all__ = ['PeakMemory']


def _release_free_heap() -> None:
    """Returns the C allocator's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere),
    so that memory freed before a measurement but still resident cannot hide a later peak."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_mb(key: str) -> Optional[float]:
    try:
        with open('/proc/self/status') as f:
            m = re.search(rf'^{key}:\s+(\d+)\s+kB', f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024.0 if m else None


class PeakMemory:
    """Peak memory over a ``with`` block (see the module docstring for what is counted).

    After the block: ``peak_mb`` (CPU: peak RSS minus RSS at entry; CUDA: max allocated bytes),
    ``baseline_mb`` (RSS or allocated bytes at entry), ``kind`` (how it was measured), and
    :meth:`current_mb` samples the current value (RSS minus baseline, or allocated bytes).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == 'cuda'
        self.peak_mb: Optional[float] = None
        self.baseline_mb: Optional[float] = None
        self.kind = ''
        self._sampler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sampled = 0.0

    def current_mb(self) -> Optional[float]:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / 2 ** 20
        rss = _proc_status_mb('VmRSS')
        return None if rss is None or self.baseline_mb is None else rss - self.baseline_mb

    def _sample(self):
        while not self._stop.wait(0.002):
            rss = _proc_status_mb('VmRSS')
            if rss is not None:
                self._sampled = max(self._sampled, rss)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2 ** 20
            self.kind = 'torch.cuda.max_memory_allocated (weights included)'
            return self
        import gc
        gc.collect()
        _release_free_heap()
        self.baseline_mb = _proc_status_mb('VmRSS')
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kind = 'peak RSS delta (VmHWM after reset via /proc/self/clear_refs)'
        except OSError:
            self._sampled = self.baseline_mb or 0.0
            self._sampler = threading.Thread(target=self._sample, name='viddet-rss-sampler', daemon=True)
            self._sampler.start()
            self.kind = 'peak RSS delta (VmRSS sampled every 2 ms)'
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            return False
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = max(self._sampled, _proc_status_mb('VmRSS') or 0.0)
        else:
            peak = _proc_status_mb('VmHWM')
        if peak is not None and self.baseline_mb is not None:
            self.peak_mb = max(0.0, peak - self.baseline_mb)
        return False
