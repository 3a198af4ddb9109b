"""Where computation runs: the cores a process is given, torch's thread count by default, whether
frame decoding overlaps the model, and device names."""
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from viddet import runtime
from viddet.data.image_sources import ArraySource
from viddet.errors import VidDetError


def test_cores_given_follows_affinity_and_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime.os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3, 4, 5})
    real_open = open

    def fake_open(path, *a, **k):
        if path == '/sys/fs/cgroup/cpu.max':
            return real_open(tmp_path / 'cpu.max', *a, **k)
        raise OSError('not there')
    (tmp_path / 'cpu.max').write_text('250000 100000\n')      # docker --cpus=2.5
    monkeypatch.setattr('builtins.open', fake_open)
    assert runtime.cores_given() == 2
    (tmp_path / 'cpu.max').write_text('max 100000\n')         # no quota: the affinity mask
    assert runtime.cores_given() == 6


def test_default_threads_are_capped_at_the_cores_given(monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime, 'cores_given', lambda: 1)
    assert runtime.set_threads(None) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(runtime, 'cores_given', lambda: 8)
    torch.set_num_threads(2)
    assert runtime.set_threads(None) == 2                       # never raised above torch's own choice
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')                 # torchrun: 4 processes share 8 cores
    torch.set_num_threads(8)
    assert runtime.set_threads(None) == 2
    assert runtime.set_threads(3) == 3 and torch.get_num_threads() == 3
    with pytest.raises(VidDetError, match='--threads must be >= 1, got 0'):
        runtime.set_threads(0)


def test_decoding_overlaps_the_model_only_on_a_spare_core(monkeypatch):
    frames = [np.zeros((4, 4, 3), np.uint8)] * 3

    def decode_threads(spare):
        monkeypatch.setattr('viddet.data.frames.spare_cores', lambda: spare)
        release = threading.Event()

        def slow():   # the producer waits until the consumer has looked at the threads
            for f in frames:
                yield f
                release.wait(5)
        seen = []
        for _ in ArraySource(slow()):
            seen.append(any(t.name.startswith('viddet-decode') for t in threading.enumerate()))
            release.set()
        return any(seen)
    assert decode_threads(1) is True     # a core left over: a background decoder
    assert decode_threads(0) is False    # none: decoded in turn, in the caller's thread
    assert [f.index for f in ArraySource(frames, prefetch=0)] == [0, 1, 2]


# ------------------------------------------------------------------------------ CPU kernels
@pytest.fixture
def cpu(monkeypatch):
    """Sets the CPU's vendor and PyTorch's kernel level that :func:`runtime.cpu_kernels` sees."""
    for variable in ('VIDDET_CPU_GEMM', 'VIDDET_WINOGRAD', 'VIDDET_WINOGRAD4'):
        monkeypatch.delenv(variable, raising=False)

    def set_cpu(vendor, capability):
        monkeypatch.setattr(runtime, '_cpu_vendor', lambda: vendor)
        monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: capability)
    return set_cpu


@pytest.mark.parametrize('vendor,capability,gemm,winograd', [
    ('AuthenticAMD', 'AVX512', 'onednn', False), ('AuthenticAMD', 'AVX2', 'mkl', True),
    ('GenuineIntel', 'AVX512', 'mkl', False), ('GenuineIntel', 'AVX512_BF16', 'mkl', False),
    ('GenuineIntel', 'AVX2', 'mkl', True), ('GenuineIntel', 'DEFAULT', 'mkl', True)])
def test_cpu_kernels_are_decided_by_the_cpu(cpu, vendor, capability, gemm, winograd):
    """oneDNN's GEMM exactly on AMD CPUs with AVX-512 (where MKL takes its AVX2 kernels); Winograd
    exactly without AVX-512 kernels; YOLOX's F(4x4, 3x3) exactly with oneDNN's GEMM (and the fused
    kernels)."""
    if gemm == 'onednn' and not runtime._onednn_gemm_available():
        pytest.skip('this PyTorch has no oneDNN inner product')
    cpu(vendor, capability)
    kernels = runtime.cpu_kernels()
    assert (kernels.cpu_capability, kernels.gemm, kernels.winograd) == (capability, gemm, winograd)
    assert kernels.winograd4 is (kernels.fused and gemm == 'onednn')
    assert kernels.as_dict() == {'cpu_capability': capability, 'gemm': gemm, 'winograd': winograd,
                                 'fused': kernels.fused, 'winograd4': kernels.winograd4}
    assert str(kernels).startswith(f"{capability}, GEMM on {gemm}, Winograd {'on' if winograd else 'off'}")


def test_cpu_kernels_settings_win_over_the_cpu(cpu, monkeypatch):
    cpu('GenuineIntel', 'AVX512')
    monkeypatch.setenv('VIDDET_WINOGRAD', '1')
    monkeypatch.setenv('VIDDET_CPU_GEMM', ' MKL ')              # case and spaces aside
    assert (runtime.cpu_kernels().gemm, runtime.cpu_kernels().winograd) == ('mkl', True)
    monkeypatch.setenv('VIDDET_WINOGRAD', '0')
    cpu('GenuineIntel', 'AVX2')
    assert runtime.cpu_kernels().winograd is False
    assert runtime.cpu_kernels(winograd=True).winograd is True   # the argument wins over the variable
    monkeypatch.setenv('VIDDET_WINOGRAD', '')                    # empty is unset: the CPU decides
    assert runtime.cpu_kernels().winograd is True
    assert runtime.cpu_kernels(fused=False).fused is False
    monkeypatch.setenv('VIDDET_WINOGRAD4', '1')                  # YOLOX's F(4x4, 3x3) without oneDNN's GEMM
    assert runtime.cpu_kernels().winograd4 is True
    assert runtime.cpu_kernels(winograd4=False).winograd4 is False
    assert runtime.cpu_kernels(fused=False).winograd4 is False   # nothing fused: plain convolutions
    monkeypatch.setenv('VIDDET_WINOGRAD4', 'on')
    with pytest.raises(VidDetError, match="VIDDET_WINOGRAD4='on' is not valid: use 1 or 0"):
        runtime.cpu_kernels()


@pytest.mark.parametrize('call,message', [
    (lambda: runtime.cpu_kernels(gemm='blas'), "cpu_kernels(gemm='blas') is not valid: use mkl or onednn"),
    (lambda: runtime.cpu_kernels(winograd='yes'), "cpu_kernels(winograd='yes'): use True, False or None"),
    (lambda: runtime.cpu_kernels(fused=1.5), "cpu_kernels(fused=1.5): use True, False or None"),
    (lambda: runtime.cpu_kernels(winograd4='yes'), "cpu_kernels(winograd4='yes'): use True, False or None")])
def test_invalid_kernel_arguments_are_refused(call, message):
    with pytest.raises(VidDetError) as e:
        call()
    assert str(e.value).startswith(message)


def test_kernels_this_pytorch_cannot_run_are_refused(cpu, monkeypatch):
    cpu('AuthenticAMD', 'AVX512')
    monkeypatch.setattr(runtime, '_onednn_gemm_available', lambda: False)
    assert runtime.cpu_kernels().gemm == 'mkl'                   # the CPU's choice falls back
    monkeypatch.setenv('VIDDET_CPU_GEMM', 'onednn')
    with pytest.raises(VidDetError, match='VIDDET_CPU_GEMM=onednn: this PyTorch has no oneDNN inner product'):
        runtime.cpu_kernels()
    monkeypatch.setattr(runtime, '_fused_kernels_problem', lambda: 'this PyTorch lacks torch.ops.mkldnn.x')
    assert runtime.cpu_kernels(gemm='mkl').fused is False        # recorded, not silently dropped later
    with pytest.raises(VidDetError, match=r'cpu_kernels\(fused=True\): this PyTorch lacks'):
        runtime.cpu_kernels(gemm='mkl', fused=True)


def test_the_fused_kernel_probe_passes_where_onednn_runs():
    if not torch.backends.mkldnn.is_available():
        pytest.skip('PyTorch without oneDNN')
    assert runtime._fused_kernels_problem() is None and runtime.cpu_kernels().fused


def test_download_locations_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv('VIDDET_HOME', str(tmp_path))
    monkeypatch.setenv('VIDDET_ZOO_BASE', 'http://mirror/zoo')
    monkeypatch.delenv('VIDDET_WEIGHTS_BASE', raising=False)
    assert runtime.viddet_home() == tmp_path and runtime.zoo_base('https://x') == 'http://mirror/zoo'
    assert runtime.weights_base() is None
    monkeypatch.delenv('VIDDET_HOME')
    monkeypatch.delenv('VIDDET_ZOO_BASE')
    assert runtime.viddet_home() == Path.home() / '.cache' / 'viddet' and runtime.zoo_base('https://x') == 'https://x'
