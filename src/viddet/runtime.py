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


def set_threads(threads: Optional[int]) -> None:
    """``torch.set_num_threads(threads)`` for this process; None keeps torch's default.

    Raises:
        VidDetError: threads < 1.
    """
    if threads is None:
        return
    if threads < 1:
        raise VidDetError(f'--threads must be >= 1, got {threads}')
    torch.set_num_threads(threads)


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
