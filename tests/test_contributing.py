"""The walk-throughs of docs/CONTRIBUTING.md work as written: the example method runs a video and a
training step through the real engine, and the example backbone builds a working detector."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from viddet.data.image_sources import ArraySource
from viddet.engine.video import run_video
from viddet.structures import ImageMeta, TrainSample

DOC = Path(__file__).resolve().parents[1] / 'docs' / 'CONTRIBUTING.md'
pytestmark = pytest.mark.usefixtures('one_thread')


def example(marker: str) -> dict:
    """Executes the ```python block of the doc that starts with ``# docs/CONTRIBUTING.md: <marker>``."""
    blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), re.S)
    (code,) = [b for b in blocks if b.startswith(f'# docs/CONTRIBUTING.md: {marker}')]
    namespace: dict = {}
    exec(compile(code, f'{DOC}:{marker}', 'exec'), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_example_method_detects_a_video_and_trains():
    PrevAverage = example('example method')['PrevAverage']
    torch.manual_seed(0)
    model = PrevAverage.build('mobilenetv2', num_classes=3).eval()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    calls = []
    detect = model.detector.detect
    model.detector.detect = lambda feats, meta, timer: calls.append(feats.clone()) or detect(feats, meta, timer)
    results = list(run_video(model, ArraySource(frames), scale=(64, 48)))
    assert [r.frame.index for r in results] == [0, 1, 2]
    # frame 1's features are the mean of frames 0 and 1: recompute them independently
    with torch.no_grad():
        f0, f1 = (model.detector.extract_feat(r.frame.img) for r in results[:2])
    torch.testing.assert_close(calls[1], (f0 + f1) / 2)
    model.train()
    meta = ImageMeta((48, 64), (48, 64), (48, 64), np.ones(4, np.float32))
    sample = TrainSample(torch.randn(3, 48, 64), torch.randn(1, 3, 48, 64), [meta, meta],
                         torch.tensor([[4.0, 4.0, 40.0, 30.0]]), torch.tensor([1]), seed=0)
    model.train_cfg.rcnn_sampler.num = 16
    losses = model.forward_train(sample)
    assert {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox'} <= set(losses)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    assert model.detector.rpn_head.rpn_conv.weight.grad is not None


def test_example_backbone_builds_a_detector():
    from viddet.models.detector import FasterRCNN, build_faster_rcnn
    r152 = example('example backbone')['r152']
    assert (r152.name, r152.title) == ('r152', 'R-152')
    body = r152.build()
    assert body.out_channels == 2048 and len(body.layer3) == 36
    det = build_faster_rcnn('r50')
    det = FasterRCNN(body, det.neck, det.rpn_head, det.roi_head).eval()
    with torch.no_grad():
        assert det.extract_feat(torch.randn(1, 3, 64, 96)).shape == (1, 512, 4, 6)
