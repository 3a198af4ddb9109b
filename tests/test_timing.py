"""StageTimer: per-stage seconds, and on CUDA it synchronises the model's own device (not the
current default one) around each stage."""
import time

import torch

from viddet.timing import NO_TIMER, StageTimer


def test_stage_timer_accumulates_and_pops():
    timer = StageTimer(True)
    with timer('backbone'):
        time.sleep(0.01)
    with timer('backbone'):
        pass
    with timer('nms'):
        pass
    got = timer.pop()
    assert set(got) == {'backbone', 'nms'} and got['backbone'] >= 0.01
    assert timer.pop() == {}
    with NO_TIMER('x'):
        pass
    assert NO_TIMER.pop() == {}


def test_stage_timer_synchronises_the_models_cuda_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: calls.append(device))
    timer = StageTimer(True, torch.device('cuda', 1))
    with timer('rpn'):
        pass
    assert calls == [torch.device('cuda', 1)] * 2      # before and after the stage, on cuda:1
    calls.clear()
    with StageTimer(True, torch.device('cpu'))('rpn'):
        pass
    assert calls == []
