"""The Python API (viddet.api.VideoDetector): input kinds and their default modes, max_frames,
from_checkpoint's method/backbone/class-name handling, device resolution."""
import cv2
import numpy as np
import pytest
import torch

from viddet import VID_CLASSES, VidDetError
from viddet.api import VideoDetector
from viddet.runtime import resolve_device
from viddet.data.frames import Frame, FrameSource
from viddet.data.sources import open_source
from viddet.linking.link import link_video
from viddet.linking.tracker import IoUTracker
from viddet.methods import build_method
from viddet.models.detector import RPNConfig
from scripted_method import ONLINE_IDS, SEQNMS_IDS, scripted_detector

SCALE = (128, 96)


pytestmark = pytest.mark.usefixtures('one_thread')


def tiny(method):
    torch.manual_seed(0)
    model = build_method(method, 'r50')
    model.detector.rpn_test_cfg = RPNConfig(max_per_img=30)
    return VideoDetector(model, VID_CLASSES, torch.device('cpu'), scale=SCALE)


@pytest.fixture(scope='module')
def single():
    return tiny('single')


@pytest.fixture(scope='module')
def selsa():
    return tiny('selsa')


def images(n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp('frames')
    for i, img in enumerate(images(4)):
        cv2.imwrite(str(d / f'{i}.png'), img)   # lossless: decoded frames equal images(4)
    return d


def same(a, b):
    return (torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
            and torch.equal(a.labels, b.labels))


def test_endless_iterable_with_max_frames_stops_pulling(single):
    pulled = []

    def camera():
        rng = np.random.default_rng(1)
        while True:
            if len(pulled) > 10:
                raise AssertionError('the iterable was drained past max_frames')
            pulled.append(1)
            yield rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)

    results = list(single.predict(camera(), max_frames=3))
    assert [r.frame.index for r in results] == [0, 1, 2]
    assert len(pulled) == 3
    assert [r.frame.name for r in results] == ['000000', '000001', '000002']


def test_inputs_give_the_same_detections(single, folder):
    """A folder path, an open FrameSource, a list and an iterator of the same frames."""
    from_list = list(single.predict(images(4)))
    from_path = list(single.predict(str(folder)))
    with open_source(str(folder)) as source:
        from_source = list(single.predict(source))
    from_iter = list(single.predict(iter(images(4))))
    assert len(from_list) == len(from_path) == len(from_source) == len(from_iter) == 4
    for a, b, c, d in zip(from_list, from_path, from_source, from_iter):
        assert len(a.detections) > 0
        assert same(a.detections, b.detections) and same(a.detections, c.detections)
        assert same(a.detections, d.detections)
    assert [r.frame.name for r in from_path] == ['0.png', '1.png', '2.png', '3.png']
    assert from_list[0].frame.image.shape == (48, 64, 3)


def test_max_frames_for_every_input_kind(single, folder):
    assert len(list(single.predict(images(4), max_frames=2))) == 2
    assert len(list(single.predict(str(folder), max_frames=3))) == 3
    with open_source(str(folder)) as source:
        assert len(list(single.predict(source, max_frames=2))) == 2


def test_default_modes_sequence_offline_iterator_online(selsa, folder):
    # offline SELSA needs the length and random access: a list and a folder have them
    assert len(list(selsa.predict(images(3)))) == 3
    with open_source(str(folder)) as source:       # max_frames shortens the video SELSA sees
        assert len(list(selsa.predict(source, max_frames=2))) == 2
    # a plain iterator is a stream: online by default ...
    assert len(list(selsa.predict(iter(images(3))))) == 3
    # ... and offline methods cannot run on it
    with pytest.raises(VidDetError, match='is a live source: offline mode needs future frames; use --mode online'):
        list(selsa.predict(iter(images(3)), mode='offline'))


def test_from_checkpoint_argument_errors_and_random_weights():
    with pytest.raises(VidDetError, match="unknown method 'yolo'"):
        VideoDetector.from_checkpoint('x.pth', method='yolo')
    det = VideoDetector.from_checkpoint(method='dff', random_weights=True, device='cpu')
    assert det.method == 'dff' and det.class_names == VID_CLASSES and det.device == torch.device('cpu')
    assert not det.model.training


def test_resolve_device():
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('auto') == torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if not torch.cuda.is_available():
        with pytest.raises(VidDetError, match="--device cuda:1: this PyTorch sees no CUDA GPU: use --device cpu"):
            resolve_device('cuda:1')
    with pytest.raises(VidDetError, match=r"--device 'gpu0' is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_device('gpu0')


def test_single_frame_model_from_a_troi_checkpoint(tmp_path):
    """``--method single`` with a TRoI file: the detector part, with its 3 shared fcs."""
    torch.manual_seed(5)
    troi = build_method('troi', 'r50')
    path = tmp_path / 'troi.pth'
    torch.save({'state_dict': troi.state_dict(), 'meta': {'CLASSES': VID_CLASSES}}, path)
    det = VideoDetector.from_checkpoint(str(path), method='single', device='cpu')
    assert det.method == 'single'
    head = det.model.detector.roi_head.bbox_head
    from viddet.models.detector import BBoxHead, SingleRoIExtractor
    assert len(head.shared_fcs) == 3 and type(head) is BBoxHead
    from viddet.models.temporal_roi_align import TemporalRoIAlign
    extractor = det.model.detector.roi_head.bbox_roi_extractor
    assert isinstance(extractor, SingleRoIExtractor) and not isinstance(extractor, TemporalRoIAlign)
    assert torch.equal(head.shared_fcs[2].weight, troi.detector.roi_head.bbox_head.shared_fcs[2].weight)
    assert torch.equal(det.model.detector.backbone.layer4[2].conv3.weight,
                       troi.detector.backbone.layer4[2].conv3.weight)
    # the default method is what the file is
    assert VideoDetector.from_checkpoint(str(path), device='cpu').method == 'troi'


def test_test_scale_comes_from_a_viddet_training_config():
    from viddet.checkpoints.loading import inference_scale
    from viddet.data.transforms import DEFAULT_SCALE
    assert inference_scale({'config': {'data': {'scale': [320, 192]}}}) == (320, 192)
    assert inference_scale({'CLASSES': ('a',)}) == DEFAULT_SCALE          # MMTracking meta: (1000, 600)
    assert inference_scale({'config': 'pretty text of an mmcv config'}) == DEFAULT_SCALE


def test_checkpoint_test_settings_are_applied_unless_overridden(tmp_path):
    """A viddet training checkpoint records ``model.test`` (FGFA's window here); loading it builds the
    method with those settings, explicit keyword arguments win, and ``--method single`` ignores them."""
    from viddet.checkpoints.loading import checkpoint_test_settings
    torch.manual_seed(0)
    fgfa = build_method('fgfa', 'mobilenetv2')
    meta = {'CLASSES': VID_CLASSES, 'config': {'model': {'test': {'num_left': 5, 'num_right': 5}}}}
    path = tmp_path / 'fgfa.pth'
    torch.save({'state_dict': fgfa.state_dict(), 'meta': meta}, path)
    from viddet.methods import FGFA
    assert checkpoint_test_settings(meta, FGFA) == FGFA.Settings(num_left=5, num_right=5)
    assert checkpoint_test_settings({'config': 'mmcv config text'}, FGFA) == FGFA.Settings()
    det = VideoDetector.from_checkpoint(str(path), device='cpu')
    assert (det.model.num_left, det.model.num_right) == (5, 5)
    assert det.model.window(20, 99, 'offline') == list(range(15, 26))
    det = VideoDetector.from_checkpoint(str(path), device='cpu', num_left=2)
    assert (det.model.num_left, det.model.num_right) == (2, 5)
    assert VideoDetector.from_checkpoint(str(path), method='single', device='cpu').method == 'single'


# ------------------------------------------------------------------------------------ linking
@pytest.fixture(scope='module')
def scripted():
    return scripted_detector()


def test_predict_link_online_and_seqnms_hand_computed(scripted):
    plain = list(scripted.predict(images(6)))
    assert all(r.detections.track_ids is None for r in plain)
    online = list(scripted.predict(images(6), link='online'))
    assert [r.detections.track_ids.tolist() for r in online] == ONLINE_IDS
    for a, b in zip(plain, online):                       # online keeps every box unchanged
        assert same(a.detections, b.detections)
    seqnms = list(scripted.predict(images(6), link='seqnms'))
    assert [r.detections.track_ids.tolist() for r in seqnms] == SEQNMS_IDS
    assert [r.detections.labels.tolist() for r in seqnms] == [[0, 1]] * 2 + [[0]] + [[0, 1]] * 3
    assert all(torch.allclose(r.detections.scores, torch.tensor([0.8, 0.8][:len(r.detections)])) for r in seqnms)
    # the same as linking the plain results afterwards
    for a, b in zip(seqnms, link_video([r.detections for r in plain], 'seqnms')):
        assert same(a.detections, b) and torch.equal(a.detections.track_ids, b.track_ids)


def test_seqnms_second_pass_yields_the_source_frames(scripted, folder):
    detected = []
    results = list(scripted.predict(str(folder), link='seqnms', on_detected=lambda r: detected.append(r.frame.index)))
    assert detected == [0, 1, 2, 3]
    assert [r.frame.name for r in results] == ['0.png', '1.png', '2.png', '3.png']
    for r, img in zip(results, images(4)):
        np.testing.assert_array_equal(r.frame.image, img)
        assert r.frame.img is None and r.frame.meta.ori_shape == (48, 64)
    assert len(list(scripted.predict(str(folder), link='seqnms', max_frames=2))) == 2


class CausalStream(FrameSource):
    """Frames read in order only, and never before the consumer received the previous result."""

    def __init__(self, n):
        super().__init__('<causal stream>')
        self.length, self.delivered, self.images = n, 0, images(n)

    def __iter__(self):
        for i in range(self.length):
            if i > self.delivered:
                raise AssertionError(f'frame {i} was read while the consumer was at frame {self.delivered}')
            yield Frame(i, f'{i:06d}', self.images[i])

    def get(self, i):
        raise AssertionError(f'get({i}) was called')


def test_online_linking_never_reads_a_future_frame(scripted):
    source = CausalStream(6)
    ids = []
    for r in scripted.predict(source, mode='online', link='online'):
        ids.append(r.detections.track_ids.tolist())
        source.delivered += 1
    assert ids == ONLINE_IDS
    # the guard does catch look-ahead: Seq-NMS has to read the whole video first
    with pytest.raises(AssertionError, match='frame 1 was read while the consumer was at frame 0'):
        next(scripted.predict(CausalStream(6), mode='online', link='seqnms'))


def test_track_ids_are_stable_when_a_stream_restarts_from_the_same_frame(scripted):
    tracker = IoUTracker()
    first = [r.detections.track_ids.tolist() for r in scripted.predict(iter(images(6)), link='online', tracker=tracker)]
    again = [r.detections.track_ids.tolist() for r in scripted.predict(iter(images(6)), link='online', tracker=tracker)]
    cut = [r.detections.track_ids.tolist() for r in scripted.predict(iter(images(6)), link='online', max_frames=3)]
    assert first == again == ONLINE_IDS and cut == ONLINE_IDS[:3]


def test_predict_link_errors(scripted):
    with pytest.raises(VidDetError, match="unknown link mode 'tubes'; expected one of seqnms, online, none"):
        next(scripted.predict(images(2), link='tubes'))
    with pytest.raises(VidDetError, match='<arrays> is a live stream: Seq-NMS links the whole video .* link online'):
        next(scripted.predict(iter(images(2)), link='seqnms'))
