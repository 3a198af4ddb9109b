"""viddet benchmark (issue #6): the CLI on tiny configurations, and the SELSA reference cache invariant."""
import json

import numpy as np
import pytest
import torch

from viddet.benchmark import SyntheticVideo, parse_size
from viddet.cli import main
from viddet import VidDetError
from viddet.peak_memory import PeakMemory

KEYS = {'method', 'backbone', 'device', 'size', 'frames', 'fps', 'latency_ms_median',
        'latency_ms_p90', 'peak_memory_mb', 'stages_ms'}


@pytest.mark.parametrize('method', ['single', 'selsa'])
def test_benchmark_cli_writes_json(tmp_path, method, capsys):
    out = tmp_path / 'sub' / 'bench.json'
    rc = main(['benchmark', '--method', method, '--size', '128x96', '--frames', '3', '--warmup', '1',
               '--json', str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert KEYS <= set(rec)
    assert rec['method'] == method and rec['backbone'] == 'r50' and rec['device'] == 'cpu'
    assert rec['size'] == '128x96' and rec['frames'] == 3
    assert len(rec['latency_ms_per_frame']) == 3 and len(rec['warmup_latency_ms']) == 1
    assert rec['fps'] > 0 and rec['latency_ms_p90'] >= rec['latency_ms_median'] > 0
    # fps is derived from the mean latency of the timed frames
    assert rec['fps'] == pytest.approx(1000 / np.mean(rec['latency_ms_per_frame']), rel=1e-2)
    assert rec['peak_memory_mb'] is not None and rec['peak_memory_mb'] >= 0
    from viddet.runtime import cpu_kernels
    assert rec['fast_paths'] is True and rec['cpu_kernels'] == cpu_kernels().as_dict()
    assert rec['cpu_kernels']['cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    stages = rec['stages_ms']
    assert {'backbone', 'rpn', 'roi_head', 'nms'} <= set(stages)
    if method == 'selsa':
        assert 'aggregation' in stages
    assert all(v >= 0 for v in stages.values())
    # the stages and the rest add up to the mean latency
    assert sum(stages.values()) == pytest.approx(rec['latency_ms_mean'], rel=1e-2, abs=0.5)
    assert not list(out.parent.glob('.*.tmp'))  # atomic write left no temporary file
    printed = capsys.readouterr().out
    assert 'fps' in printed and f"CPU kernels: {rec['cpu_kernels']['cpu_capability']}" in printed


def test_benchmark_cli_bad_input_is_a_clear_error(capsys, monkeypatch):
    assert main(['benchmark', '--method', 'single', '--size', '12by8', '--frames', '1']) == 2
    assert '--size' in capsys.readouterr().err
    assert main(['benchmark', '--method', 'single', '--size', '64x64', '--frames', '0']) == 2
    assert '--frames' in capsys.readouterr().err
    monkeypatch.setenv('VIDDET_CPU_GEMM', 'openblas')
    assert main(['benchmark', '--method', 'single', '--size', '64x64', '--frames', '1']) == 2
    assert "VIDDET_CPU_GEMM='openblas' is not valid: use mkl or onednn" in capsys.readouterr().err


def test_benchmark_records_the_plain_modules(tmp_path):
    from viddet.benchmark import benchmark
    rec = benchmark('single', size=(64, 48), frames=1, warmup=0, fast=False).as_dict()
    assert rec['fast_paths'] is False and rec['cpu_kernels'] is None


def test_parse_size():
    assert parse_size('1000x600') == (1000, 600)
    assert parse_size('320X192') == (320, 192)
    with pytest.raises(VidDetError):
        parse_size('0x10')


def test_synthetic_video_is_smooth_deterministic_and_moving():
    v = SyntheticVideo(64, 48, 5, seed=3)
    a = v.frame(2)
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, SyntheticVideo(64, 48, 5, seed=3).get(2).image)
    assert not np.array_equal(v.frame(0), v.frame(1))
    # frame 1 is frame 0 moved by (3, 2) pixels
    assert np.array_equal(v.frame(1)[:-2, :-3], v.frame(0)[2:, 3:])
    # smooth: neighbouring pixels differ much less than independent random pixels (~85 grey levels)
    assert np.abs(np.diff(a.astype(int), axis=1)).mean() < 20
    assert [i for i, _, _ in v] == [0, 1, 2, 3, 4] and v.length == 5


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device('cpu')) as mem:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MB, touched
        del x
    assert mem.peak_mb is not None and mem.peak_mb >= 60


def test_selsa_without_reference_cache_gives_the_same_detections():
    """ref_cache=False recomputes the references' RPN + RoI head every frame (MMTracking's way);
    the cache must not change any detection."""
    from viddet.methods import build_method
    from viddet.engine.video import run_video

    torch.manual_seed(0)
    cached = build_method('selsa', 'r50').eval()
    uncached = build_method('selsa', 'r50', ref_cache=False).eval()
    uncached.load_state_dict(cached.state_dict())
    # spread the classifier outputs so that NMS and the score threshold have something to do
    with torch.no_grad():
        for m in (cached, uncached):
            m.detector.roi_head.bbox_head.fc_cls.weight.mul_(50)
    video = SyntheticVideo(96, 64, 5, seed=1)
    runs = []
    for model in (cached, uncached):
        runs.append([r.detections for r in run_video(model, video, scale=(96, 64))])
    assert len(runs[0]) == len(runs[1]) == 5
    total = 0
    for a, b in zip(*runs):
        assert len(a) == len(b)
        total += len(a)
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    assert total > 0


@pytest.mark.parametrize('method', ['troi', 'fgfa'])
def test_benchmark_runs_under_bf16_autocast(method):
    """--amp bf16 on the CPU: every fast path copes with mixed dtypes (results are not parity-exact)."""
    from viddet.benchmark import benchmark
    r = benchmark(method=method, size=(64, 64), frames=1, warmup=1, amp='bf16')
    rec = r.as_dict()
    assert rec['amp'] == 'bf16' and rec['frames'] == 1 and rec['fps'] > 0


def _roofline_module():
    """``benchmarks/roofline.py`` (a script: benchmarks/ is its import path)."""
    import importlib
    import sys
    from pathlib import Path
    bench = str(Path(__file__).resolve().parents[1] / 'benchmarks')
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module('roofline')


@pytest.mark.parametrize('use_winograd', [False, True])
def test_roofline_counts_the_flops_the_fast_path_executes(use_winograd):
    """``roofline.py``'s FLOP formulas for the fused oneDNN ops: with Winograd off the fast RPN
    head executes exactly the plain head's FLOPs; with it on, its 3x3 conv counts as Winograd's 16
    batched products over the 2x2 output tiles (2 * 16 * tiles * C * O) instead of the direct
    2 * 9 * H * W * C * O. The plain count comes from the fast head given ``plain_layer_kernels``."""
    from torch.utils.flop_counter import FlopCounterMode
    from viddet import speedups
    from viddet.models.detector import RPNHead
    from viddet.runtime import cpu_kernels
    roofline = _roofline_module()
    kernels = cpu_kernels(winograd=use_winograd)
    torch.manual_seed(0)
    c, h, w = 128, 12, 14                       # 6 x 7 = 42 output tiles: Winograd takes it
    head = speedups.convert(RPNHead(channels=c).eval(), kernels)
    x = torch.randn(1, c, h, w).contiguous(memory_format=torch.channels_last)
    roofline._register_onednn_flop_formulas()
    with torch.inference_mode():
        head(x)   # builds the fast path (folded weights, Winograd's filter transform) once, uncounted
        plain, executed = FlopCounterMode(display=False), FlopCounterMode(display=False)
        speedups.convert(head, roofline.plain_layer_kernels(kernels))
        with plain:
            head(x)
        speedups.convert(head, kernels)
        with executed:
            head(x)
    conv3x3 = 2 * 9 * h * w * c * c
    winograd_products = 2 * 16 * (h // 2) * (w // 2) * c * c
    assert plain.get_total_flops() > conv3x3
    expected = plain.get_total_flops() - (conv3x3 - winograd_products if use_winograd else 0)
    assert executed.get_total_flops() == expected


def test_roofline_weights_dff_seconds_like_its_flops():
    """DFF's 1-in-10 mix: one steady key frame (not the first) and the median of the non-key frames
    after the first non-key one (FlowNet's warm-up), worked by hand."""
    roofline = _roofline_module()
    frames = [0, 1, 4, 5, 6, 7, 8, 9, 10, 11]
    seconds = [6.4, 2.7, 1.3, 1.4, 1.2, 1.3, 1.5, 1.3, 5.1, 1.3]
    assert roofline.dff_steady_seconds(frames, seconds, 10) == (5.1, 1.3)
    with pytest.raises(SystemExit, match='no steady key frame'):
        roofline.dff_steady_seconds(frames, seconds, 20)
