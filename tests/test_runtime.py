"""Where computation runs: the cores a process is given, torch's thread count by default, whether
frame decoding overlaps the model, and device names."""
import threading

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
