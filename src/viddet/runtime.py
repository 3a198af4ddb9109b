"""Where and how computation runs: the torch device, CPU threads, and the process group of a
``torchrun`` launch. Every command and the Python API resolve these here, the same way."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from viddet.errors import VidDetError


def world_info() -> Tuple[int, int, int]:
    """(rank, local_rank, world_size) from ``torchrun``'s environment (0, 0, 1 without it)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    return rank, int(os.environ.get('LOCAL_RANK', str(rank))), world


def resolve_device(spec: Optional[str] = 'auto') -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device.

    ``auto`` is CUDA when available, else the CPU. Under ``torchrun`` (``LOCAL_RANK`` set) a bare
    ``cuda`` or ``auto`` means this process's own GPU, ``cuda:<LOCAL_RANK>``, so that N processes on
    one machine use N GPUs instead of all sharing GPU 0.

    Raises:
        VidDetError: not a device name, a device type viddet does not run on, CUDA asked for but
            not available, or a GPU index this machine does not have.
    """
    spec = 'auto' if spec in (None, '') else str(spec)
    if spec == 'auto':
        spec = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise VidDetError(f'--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N') from None
    if dev.type not in ('cpu', 'cuda'):
        raise VidDetError(f'--device {spec!r}: viddet runs on cpu or cuda devices')
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise VidDetError(f'--device {spec}: this PyTorch sees no CUDA GPU: use --device cpu')
        if dev.index is None:
            _, local_rank, world = world_info()
            dev = torch.device('cuda', local_rank if world > 1 else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise VidDetError(f'--device {spec}: this machine has {torch.cuda.device_count()} GPU(s) '
                              f'(cuda:0..cuda:{torch.cuda.device_count() - 1})')
    return dev


def cores_given() -> int:
    """The CPU cores this process may use: its affinity mask (``taskset``, ``docker --cpuset-cpus``),
    capped by a cgroup CPU quota (``docker --cpus``, Kubernetes limits), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    for path, parse in (('/sys/fs/cgroup/cpu.max', lambda t: t.split()),                  # cgroup v2
                        ('/sys/fs/cgroup/cpu/cpu.cfs_quota_us', None)):                   # cgroup v1
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if parse is not None:
            quota, period = parse(text)[:2]
        else:
            quota = text
            try:
                period = open('/sys/fs/cgroup/cpu/cpu.cfs_period_us').read().strip()
            except OSError:
                continue
        if quota not in ('max', '-1'):
            try:
                cores = min(cores, max(1, int(int(quota) / int(period))))
            except (ValueError, ZeroDivisionError):
                pass
        break
    return max(1, cores)


def set_threads(threads: Optional[int] = None) -> int:
    """Sets torch's CPU threads for this process and returns the count in force.

    ``threads`` None: the cores this process is given (:func:`cores_given`) when torch would use
    more — e.g. in a container limited to 2 CPUs on a 64-core host torch starts 64 threads, which
    fight over 2 cores at every barrier; under ``torchrun`` the cores are divided between the
    processes of the machine (``LOCAL_WORLD_SIZE``) — and torch's own choice otherwise. OpenCV's
    threads are limited to the cores torch leaves over.

    Raises:
        VidDetError: threads < 1.
    """
    if threads is not None and threads < 1:
        raise VidDetError(f'--threads must be >= 1, got {threads}')
    if threads is None:   # torchrun's processes on this machine share its cores
        per_process = max(1, cores_given() // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1'))))
        threads = min(torch.get_num_threads(), per_process)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    _opencv_threads()
    return threads


def _opencv_threads() -> None:
    """OpenCV's own thread pool (JPEG decode, the preprocessing resize) only on cores torch leaves
    over: its workers spinning next to torch's at the start of every frame stall torch's barriers."""
    import cv2
    cv2.setNumThreads(max(1, spare_cores()))


def spare_cores() -> int:
    """Cores left over by torch's threads: frame decoding overlaps the model only when this is
    positive (otherwise a decoder thread preempts one of torch's threads, and the others wait for it
    at every barrier)."""
    return max(0, cores_given() - torch.get_num_threads())


def init_distributed(device: torch.device):
    """Joins ``torchrun``'s process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1.

    Returns:
        (torch.distributed or None, rank, world_size).
    """
    rank, _, world = world_info()
    if world <= 1:
        return None, 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist, dist.get_rank(), dist.get_world_size()
