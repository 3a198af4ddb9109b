"""Where and how computation runs: the torch device, CPU threads, the CPU kernels of the fast paths,
the process group of a ``torchrun`` launch, and where downloads come from and go. Every command and
the Python API resolve these here, the same way: this is the one module that reads the environment
(``VIDDET_*`` settings, ``torchrun``'s variables).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
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


# ------------------------------------------------------------------------------ CPU kernels
GEMM_BACKENDS = ('mkl', 'onednn')


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """Which CPU kernels the fast paths run: decided once by :func:`cpu_kernels`, handed to every
    fast module by :func:`viddet.speedups.convert` (each keeps it as ``kernels``), and recorded
    with every result (``run.json``, the benchmark JSON, the demo's first lines): a time is only
    comparable with one taken on the same choice. Every choice gives the same values up to float
    rounding.

    Attributes:
        cpu_capability: PyTorch's CPU kernel level (``torch.backends.cpu.get_cpu_capability()``:
            'AVX2', 'AVX512', 'DEFAULT', ...).
        gemm: the library of the large float32 matrix products: ``'mkl'`` (``torch.mm``, PyTorch's
            BLAS) or ``'onednn'`` (oneDNN's inner product, ``torch.ops.mkldnn._linear_pointwise``).
        winograd: whether the wide stride-1 3x3 convolutions run as Winograd F(2x2, 3x3)
            (:mod:`viddet.speedups.winograd`).
        fused: whether the fused oneDNN convolutions (BN folded in, activation and residual add as
            post-ops, packed weights: :mod:`viddet.speedups.onednn`) run; False where this PyTorch
            lacks them or they fail a probe (then the plain convolutions run, and no Winograd).
        winograd4: whether YOLOX's 3x3 stride-1 convolutions of >= 128 channels run as Winograd
            F(4x4, 3x3) (:mod:`viddet.speedups.winograd4`; ``winograd``'s F(2x2, 3x3) takes
            precedence where both are on).
    """
    cpu_capability: str
    gemm: str
    winograd: bool
    fused: bool = True
    winograd4: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.cpu_capability}, GEMM on {self.gemm}, Winograd {'on' if self.winograd else 'off'}, "
                f"fused oneDNN kernels {'on' if self.fused else 'off'}, "
                f"YOLOX Winograd F(4x4, 3x3) {'on' if self.winograd4 else 'off'}")


def cpu_kernels(gemm: Optional[str] = None, winograd: Optional[bool] = None,
                fused: Optional[bool] = None, winograd4: Optional[bool] = None) -> CpuKernels:
    """Decides the CPU kernels of the fast paths (:class:`CpuKernels`). Each choice is, in order:
    the argument when given; else its environment variable; else what is fastest on this CPU:

    * ``gemm``, ``VIDDET_CPU_GEMM=mkl|onednn`` (any case): ``'onednn'`` exactly on AMD CPUs with
      AVX-512 (Zen 4, Zen 5), where MKL takes its AVX2 kernels and oneDNN is ~2.1x faster (2-core
      AMD EPYC Zen 5, every GEMM shape of the detectors: 300x25088x1024 94 vs 199 GFLOP/s at one
      thread); on Intel CPUs MKL is as fast or faster (129 vs 141 ms for the box head's fc6 with
      AVX-512, 387 vs 499 ms with AVX2; ``benchmarks/RESULTS.md``);
    * ``winograd``, ``VIDDET_WINOGRAD=1|0``: on exactly where PyTorch's CPU kernels are not
      AVX-512 ones (with AVX-512 oneDNN's direct convolutions are twice as fast, and Winograd was
      not measured faster there);
    * ``fused`` (no variable): whether PyTorch's fused oneDNN kernels are present and run (a tiny
      probe, once per process);
    * ``winograd4``, ``VIDDET_WINOGRAD4=1|0``: on exactly where the fused kernels run and the GEMM
      choice is oneDNN's, i.e. on AMD CPUs with AVX-512, the only ones it was measured on (YOLOV-L
      ~1.2x faster there; ``benchmarks/RESULTS.md``); a choice without the fused kernels is off.

    Raises:
        VidDetError: a value that is not one of the valid ones (naming the variable or argument and
            the valid values), or a choice this PyTorch cannot run (``onednn`` GEMM or fused
            kernels without oneDNN's ops).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    problem = _fused_kernels_problem()
    if fused is None:
        fused = problem is None
    elif fused not in (True, False):
        raise VidDetError(f'cpu_kernels(fused={fused!r}): use True, False or None (probe this PyTorch)')
    elif fused and problem is not None:
        raise VidDetError(f'cpu_kernels(fused=True): {problem}')
    gemm = _choice('VIDDET_CPU_GEMM', 'gemm', gemm, GEMM_BACKENDS, 'the CPU decides')
    if gemm is None:
        amd = 'amd' in _cpu_vendor().lower()
        gemm = 'onednn' if amd and capability.startswith('AVX512') and _onednn_gemm_available() else 'mkl'
    elif gemm == 'onednn' and not _onednn_gemm_available():
        raise VidDetError('VIDDET_CPU_GEMM=onednn: this PyTorch has no oneDNN inner product '
                          '(torch.ops.mkldnn._linear_pointwise): use mkl')
    if winograd not in (None, True, False):
        raise VidDetError(f'cpu_kernels(winograd={winograd!r}): use True, False or None (the CPU decides)')
    choice = _choice('VIDDET_WINOGRAD', 'winograd', None if winograd is None else str(int(winograd)),
                     ('1', '0'), 'on without AVX-512')
    winograd = not capability.upper().startswith('AVX512') if choice is None else choice == '1'
    if winograd4 not in (None, True, False):
        raise VidDetError(f'cpu_kernels(winograd4={winograd4!r}): use True, False or None (the CPU decides)')
    choice4 = _choice('VIDDET_WINOGRAD4', 'winograd4', None if winograd4 is None else str(int(winograd4)),
                      ('1', '0'), 'on with the fused kernels and the oneDNN GEMM')
    winograd4 = fused and (gemm == 'onednn' if choice4 is None else choice4 == '1')
    return CpuKernels(capability, gemm, winograd, fused, winograd4)


def _choice(variable: str, argument: str, given: Optional[str], valid: Tuple[str, ...],
            default: str) -> Optional[str]:
    """The argument ``given`` if not None, else ``$variable`` (stripped, lower case; None when unset
    or empty), checked against ``valid``."""
    source = f'cpu_kernels({argument}={given!r})'
    if given is None:
        source = f'{variable}={os.environ.get(variable)!r}'
        given = os.environ.get(variable, '').strip().lower() or None
    if given is not None and given not in valid:
        raise VidDetError(f'{source} is not valid: use {" or ".join(valid)} (unset: {default})')
    return given


def _cpu_vendor() -> str:
    """The CPU's vendor string on Linux (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('vendor_id'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor()


def _onednn_gemm_available() -> bool:
    return torch.backends.mkldnn.is_available() and \
        getattr(torch.ops.mkldnn, '_linear_pointwise', None) is not None


@functools.lru_cache(maxsize=None)
def _fused_kernels_problem() -> Optional[str]:
    """None where PyTorch's fused oneDNN ops (private: ``torch.ops.mkldnn``) are present and run
    on a tiny input, else why not."""
    if not torch.backends.mkldnn.is_available():
        return 'this PyTorch is built without oneDNN (torch.backends.mkldnn)'
    mk = torch.ops.mkldnn
    names = ('_convolution_pointwise', '_convolution_transpose_pointwise', '_reorder_convolution_weight',
             '_reorder_convolution_transpose_weight')
    missing = [n for n in names if getattr(mk, n, None) is None]
    if missing:
        return f'this PyTorch lacks torch.ops.mkldnn.{missing[0]}'
    try:
        with torch.inference_mode():
            x = torch.ones(1, 2, 4, 4).contiguous(memory_format=torch.channels_last)
            w = torch.ones(2, 2, 1, 1)
            y = mk._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, 'relu', [], '')
            y = mk._convolution_pointwise.binary(x, y, w, None, [0, 0], [1, 1], [1, 1], 1, 'add', 1.0,
                                                 None, [], '')
            wt = mk._reorder_convolution_transpose_weight(w, [0, 0], [0, 0], [1, 1], [1, 1], 1, [1, 2, 4, 4])
            y = mk._convolution_transpose_pointwise(y, wt, None, [0, 0], [0, 0], [1, 1], [1, 1], 1, 'none', [], '')
        if tuple(y.shape) != (1, 2, 4, 4) or float(y.min()) != 8.0:
            return f'the fused oneDNN convolution computed a wrong probe value ({float(y.min())}, expected 6)'
    except (RuntimeError, TypeError) as e:
        return f'the fused oneDNN kernels fail here ({type(e).__name__}: {str(e).splitlines()[0]})'
    return None


# ------------------------------------------------------------------------------ downloads
def viddet_home() -> Path:
    """viddet's cache folder: ``$VIDDET_HOME``, default ``~/.cache/viddet`` (downloaded
    checkpoints in ``checkpoints/``)."""
    return Path(os.environ.get('VIDDET_HOME') or Path.home() / '.cache' / 'viddet')


def zoo_base(default: str) -> str:
    """The server of the model zoo: ``$VIDDET_ZOO_BASE`` (a mirror), else ``default``."""
    return os.environ.get('VIDDET_ZOO_BASE') or default


def weights_base() -> Optional[str]:
    """``$VIDDET_WEIGHTS_BASE``, a mirror holding the initial-weight files side by side, or None."""
    return os.environ.get('VIDDET_WEIGHTS_BASE') or None
