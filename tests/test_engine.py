"""The streaming engine and the methods' frame bookkeeping (MMTracking's DFF key frames, FGFA's
``test_with_fix_stride`` window, SELSA's ``test_with_adaptive_stride`` references): which frames go
through the backbone and when, FGFA's window, SELSA's references, causality of the online
mode, bounded memory, and one-frame videos. Random R-50 weights, tiny frames (64 x 48, resized to
128 x 96), eval mode.

Frames are identified inside the model by their content: frame i has a constant 8 x 8 block of grey
level 10 + 2 i in its top-left corner (noise elsewhere), which the 2x bilinear resize keeps exact.
"""
import numpy as np
import pytest
import torch

from viddet import VidDetError
from viddet.data.frames import Frame, FrameSource
from viddet.data.image_sources import ArraySource
from viddet.data.transforms import IMG_MEAN_RGB, IMG_STD_RGB, preprocess
from viddet.engine.video import VideoContext, run_video
from viddet.methods import METHODS, build_method
from viddet.timing import StageTimer
from viddet.methods.faster_rcnn import FasterRCNNMethod
from viddet.methods.fgfa import FGFA
from viddet.methods.selsa import SELSA, adaptive_stride_refs
from viddet.models.detector import RPNConfig
from viddet.structures import Detections, ImageMeta

SCALE = (128, 96)


pytestmark = pytest.mark.usefixtures('one_thread')


def make_image(i: int) -> np.ndarray:
    img = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    img[:8, :8] = 10 + 2 * i
    return img


def frame_ids(imgs: torch.Tensor):
    """Frame indices of a batch of preprocessed images (N, 3, Hp, Wp), from the corner block."""
    grey = imgs[:, 0, 0, 0] * IMG_STD_RGB[0] + IMG_MEAN_RGB[0]
    ids = ((grey - 10) / 2).round().long().tolist()
    assert torch.allclose(grey, torch.tensor([10. + 2 * i for i in ids]), atol=1e-3)
    return ids


class Video:
    """A video of ``n`` synthetic frames, read through a :class:`FrameSource` that can guard against
    reading ahead of the frame the engine has delivered results for (no prefetch thread here)."""

    def __init__(self, n: int):
        self.n = n
        self.delivered = 0     # results received by the test so far
        self.fetched = []

    def source(self, causal=False, length='known', fetch='yes') -> FrameSource:
        video = self

        class Source(FrameSource):
            def __iter__(self):
                for i in range(video.n):
                    if causal and i > video.delivered:
                        raise AssertionError(f'frame {i} was read while the engine was at frame {video.delivered}')
                    yield Frame(i, f'{i:06d}', make_image(i))

            def get(self, i):
                if fetch == 'raise':
                    raise AssertionError(f'get({i}) was called')
                video.fetched.append(i)
                return Frame(i, f'{i:06d}', make_image(i))

        src = Source('<test video>')
        src.length = self.n if length == 'known' else None
        src.is_live = fetch == 'none'
        return src

    def frames(self):
        return self.source()

    def run(self, model, mode='offline', causal=False, length='known', fetch='yes'):
        gen = run_video(model, self.source(causal, length, fetch), mode=mode, scale=SCALE)
        results = []
        for r in gen:
            assert r.frame.index == len(results)
            results.append(r)
            self.delivered += 1
        return results


_MODELS = {}


def get_model(method):
    """One random-weight R-50 model per method for the module, 30 proposals per frame (speed)."""
    if method not in _MODELS:
        torch.manual_seed(0)
        model = build_method(method, 'r50').eval()
        model.detector.rpn_test_cfg = RPNConfig(max_per_img=30)
        _MODELS[method] = model
    return _MODELS[method]


@pytest.fixture(scope='module', autouse=True)
def free_models():
    yield
    _MODELS.clear()


@pytest.fixture
def backbone_log(monkeypatch):
    """Records the frame index of every image that goes through ``detector.extract_feat``."""
    def install(model):
        log = []
        original = model.detector.extract_feat

        def extract_feat(imgs):
            log.extend(frame_ids(imgs))
            return original(imgs)
        monkeypatch.setattr(model.detector, 'extract_feat', extract_feat)
        return log
    return install


# ------------------------------------------------------------------------------------ context
def test_context_online_refuses_future_frames_and_offline_buffers_them():
    def prepare(img):
        return torch.zeros(3, 16, 16), ImageMeta((16, 16), (16, 16), (16, 16), np.ones(4, np.float32))

    def frames():   # a stream: no random access, no length
        return ArraySource(iter([np.zeros((4, 4, 3), np.uint8)] * 5))

    ctx = VideoContext(frames(), 'online', prepare, 'cpu', StageTimer())
    assert ctx.advance().index == 0
    with pytest.raises(VidDetError, match='online mode: frame 1 was requested while at frame 0'):
        ctx.frame(1)
    with pytest.raises(VidDetError, match='online mode'):
        ctx.fetch(1)
    assert ctx.frame(0).index == 0

    ctx = VideoContext(frames(), 'offline', prepare, 'cpu', StageTimer())
    ctx.advance()
    assert ctx.length is None
    assert ctx.frame(3).index == 3 and sorted(ctx._buffer) == [0, 1, 2, 3]
    assert ctx.frame(9) is None and ctx.length == 5 and ctx.last_index == 4   # the end tells the length
    assert ctx.advance().index == 1 and 0 not in ctx._buffer                 # past frames are dropped
    with pytest.raises(VidDetError, match='frame 0 is no longer buffered'):
        ctx.frame(0)
    with pytest.raises(VidDetError, match='no random access'):
        ctx.fetch(0)
    assert [ctx.advance().index for _ in range(3)] == [2, 3, 4] and ctx.advance() is None
    with pytest.raises(VidDetError, match='mode must be one of'):
        VideoContext(frames(), 'causal', prepare, 'cpu', StageTimer())


def test_inference_mode_does_not_leak_between_frames():
    class Probe:
        def reset(self):
            pass

        def prepare(self, image, scale):
            return preprocess(image, scale)

        def predict(self, frame, ctx):
            assert torch.is_inference_mode_enabled()
            return Detections.empty()

    gen = run_video(Probe(), Video(3).frames(), scale=SCALE)
    next(gen)
    # the caller's code between two frames runs with its own grad mode
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    assert x.grad.tolist() == [3.0, 3.0]
    assert len(list(gen)) == 2


# ------------------------------------------------------------------------------------ DFF
def test_dff_key_frames_every_10(backbone_log, monkeypatch):
    model = get_model('dff')
    log = backbone_log(model)
    pairs = []
    original = model.motion.feature_flow

    def motion(target, source, img_shape, feat_size, chunk_size=None):
        pairs.append((frame_ids(target)[0], frame_ids(source)[0]))
        return original(target, source, img_shape, feat_size, chunk_size)
    monkeypatch.setattr(model.motion, 'feature_flow', motion)
    results = Video(23).run(model)
    assert len(results) == 23
    assert log == [0, 10, 20]
    # every other frame warps its key frame's features with the flow (frame t -> key frame)
    assert pairs == [(t, t - t % 10) for t in range(23) if t % 10]


# ------------------------------------------------------------------------------------ FGFA
def test_fgfa_window_at_both_ends_of_a_5_frame_video():
    fgfa = FGFA.__new__(FGFA)
    fgfa.num_left, fgfa.num_right = 15, 15
    assert fgfa.window(0, 4, 'offline') == [0] * 16 + [1, 2, 3, 4] + [4] * 11
    assert fgfa.window(2, 4, 'offline') == [0] * 14 + [1, 2, 3] + [4] * 14
    assert fgfa.window(4, 4, 'offline') == [0] * 12 + [1, 2, 3] + [4] * 16
    assert fgfa.window(20, 40, 'offline') == list(range(5, 36))
    for t in range(5):
        w = fgfa.window(t, 4, 'offline')
        assert len(w) == 31 and w[15] == t
    assert fgfa.window(0, 4, 'online') == [0]
    assert fgfa.window(4, 4, 'online') == [0, 1, 2, 3, 4]
    assert fgfa.window(20, 20, 'online') == list(range(5, 21))


def test_fgfa_runs_each_backbone_once_and_aggregates_the_window(backbone_log, monkeypatch):
    model = get_model('fgfa')
    log = backbone_log(model)
    sources, stacks = [], []
    prepare_fn, flow_fn, agg_fn = model.motion.prepare_image, model.motion.feature_flow_prepared, model.aggregator.forward
    prepared = {}   # id of a prepared FlowNet input -> its frame

    def prepare(imgs, img_shape):
        out = prepare_fn(imgs, img_shape)
        prepared[id(out)] = frame_ids(imgs)[0]
        return out

    def motion(target, source, feat_size, chunk_size=None):
        assert prepared[id(target)] == current[0]
        sources.append([prepared[id(s)] for s in source])
        return flow_fn(target, source, feat_size, chunk_size)

    def aggregate(x, ref_x):
        stacks.append((x, ref_x))
        return agg_fn(x, ref_x)

    current = [0]
    predict = model.predict

    def tracked_predict(frame, ctx):
        current[0] = frame.index
        return predict(frame, ctx)
    monkeypatch.setattr(model.motion, 'prepare_image', prepare)
    monkeypatch.setattr(model.motion, 'feature_flow_prepared', motion)
    monkeypatch.setattr(model.aggregator, 'forward', aggregate)
    monkeypatch.setattr(model, 'predict', tracked_predict)
    results = Video(5).run(model)
    assert len(results) == 5
    assert sorted(log) == [0, 1, 2, 3, 4] and len(log) == 5   # each backbone once per video
    # flows go to every distinct frame of the window except the unwarped current slot; at the video
    # edges the current frame's replicated copies are warped by its self-flow (as MMTracking does)
    assert sources == [[0, 1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3, 4]]
    for t, (x, stack) in enumerate(stacks):
        assert stack.shape[0] == 31
        assert torch.equal(stack[15], x[0])   # the current frame's own features, unwarped


def test_fgfa_memory_is_bounded_on_a_long_video(backbone_log, monkeypatch):
    """60 frames: at most 31 cached feature maps / images, 16 buffered frames, each backbone once.
    FlowNet is replaced by zero flow here (its cost is not the point)."""
    model = get_model('fgfa')
    log = backbone_log(model)
    monkeypatch.setattr(model.motion, 'feature_flow_prepared', lambda t, s, feat_size, chunk_size=None:
                        torch.zeros(len(s), 2, *feat_size))
    sizes = []
    predict = model.predict

    def tracked_predict(frame, ctx):
        out = predict(frame, ctx)
        sizes.append((len(model._feats), len(model._imgs), len(ctx._buffer)))
        return out
    monkeypatch.setattr(model, 'predict', tracked_predict)
    assert len(Video(60).run(model)) == 60
    assert sorted(log) == list(range(60))
    assert max(s[0] for s in sizes) == 31 and max(s[1] for s in sizes) == 31
    assert sizes[30][:2] == (31, 31)                     # a full window in the middle of the video
    assert max(s[2] for s in sizes) <= 16                 # the current frame + 15 read ahead
    assert model._feats == {}                             # reset after the video


# ------------------------------------------------------------------------------------ SELSA
def test_adaptive_stride_refs_hand_written():
    assert adaptive_stride_refs(1) == [0] * 14
    assert adaptive_stride_refs(2) == [0] * 7 + [1] * 7
    assert adaptive_stride_refs(14) == list(range(14))
    assert adaptive_stride_refs(15) == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14]
    assert adaptive_stride_refs(100) == [0, 8, 15, 23, 30, 38, 46, 53, 61, 69, 76, 84, 91, 99]
    with pytest.raises(ValueError):
        adaptive_stride_refs(0)


def test_selsa_offline_backbone_runs_on_unique_refs_then_each_frame(backbone_log):
    model = get_model('selsa')
    log = backbone_log(model)
    video = Video(16)
    results = video.run(model)
    refs = adaptive_stride_refs(16)
    assert len(set(refs)) == 14
    assert log == sorted(set(refs)) + list(range(16))
    # references not yet read from the stream come from random access, each once
    assert sorted(video.fetched) == [i for i in sorted(set(refs)) if i > 0]
    assert all(len(r.detections) <= 100 for r in results)


def test_selsa_offline_needs_the_length():
    model = get_model('selsa')
    with pytest.raises(VidDetError, match='offline SELSA needs the video length'):
        Video(3).run(model, length='unknown')


@pytest.mark.parametrize('method', ['selsa', 'troi'])
def test_selsa_ref_cache_off_gives_the_same_detections(method):
    model = get_model(method)
    n = 4 if method == 'selsa' else 2
    try:
        cached = Video(n).run(model)
        model.ref_cache = False
        uncached = Video(n).run(model)
    finally:
        model.ref_cache = True
    for a, b in zip(cached, uncached):
        assert len(a.detections) == len(b.detections) > 0
        assert torch.equal(a.detections.labels, b.detections.labels)
        torch.testing.assert_close(a.detections.boxes, b.detections.boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.detections.scores, b.detections.scores, rtol=0, atol=1e-6)


def test_selsa_online_reservoir_keeps_frames_at_a_doubling_stride():
    model = SELSA.__new__(SELSA)
    model.num_refs = 14
    model._refs, model._ref_ids, model._stride = {}, [], 1
    for i in range(30):
        model._update_reservoir(i, object())
        assert len(model._ref_ids) <= 14 and set(model._refs) == set(model._ref_ids)
        if i == 13:
            assert model._ref_ids == list(range(14))
        if i == 14:
            assert model._ref_ids == list(range(0, 15, 2))
    assert model._ref_ids == list(range(0, 29, 4)) and model._stride == 4


# ------------------------------------------------------------------------------------ online / short videos
@pytest.mark.parametrize('method', ['dff', 'fgfa', 'selsa', 'troi'])
def test_online_mode_never_reads_a_future_frame(method, backbone_log):
    model = get_model(method)
    log = backbone_log(model)
    n = 3 if method == 'troi' else 4
    video = Video(n)
    results = video.run(model, mode='online', causal=True, fetch='raise')
    assert len(results) == n
    # causal methods also run the backbone in frame order, never twice on a frame (DFF only on key frames)
    assert log == ([0] if method == 'dff' else list(range(n)))
    # same with an unknown length
    assert len(Video(2).run(model, mode='online', causal=True, length='unknown', fetch='raise')) == 2


def test_online_and_offline_agree_for_causal_methods():
    """DFF and the single-frame model look only at the current / key frame: both modes are equal."""
    for method in ('single', 'dff'):
        model = get_model(method)
        a = Video(3).run(model, mode='offline')
        b = Video(3).run(model, mode='online', causal=True, fetch='raise')
        for x, y in zip(a, b):
            assert torch.equal(x.detections.boxes, y.detections.boxes)
            assert torch.equal(x.detections.scores, y.detections.scores)


@pytest.mark.parametrize('mode', ['offline', 'online'])
# the Faster R-CNN methods (YOLOV / YOLOV++: tests/test_yolov.py)
@pytest.mark.parametrize('method', [m.name for m in METHODS if issubclass(m, FasterRCNNMethod)])
def test_one_frame_video(method, mode):
    model = get_model(method)
    results = Video(1).run(model, mode=mode)
    assert len(results) == 1
    d = results[0].detections
    assert 0 < len(d) <= 100 and d.boxes.shape == (len(d), 4)
    assert bool(torch.isfinite(d.boxes).all()) and bool(torch.isfinite(d.scores).all())
    assert float(d.boxes.min()) >= 0 and float(d.boxes[:, 2].max()) <= 64 + 1e-3
    assert float(d.boxes[:, 3].max()) <= 48 + 1e-3
