"""Online tracker, the link_video entry point, Detections.track_ids and the identity metrics."""
import numpy as np
import pytest
import torch

from viddet import VidDetError
from viddet.evaluation.identity import IdentityMetrics, identity_metrics
from viddet.linking import IoUTracker, link_video
from viddet.structures import Detections


def _dets(frames, ids=None):
    """frames: per frame a list of (x1, y1, x2, y2, score, label); ids: optional per-frame id lists."""
    out = []
    for t, f in enumerate(frames):
        a = np.array(f, dtype=np.float64).reshape(-1, 6)
        out.append(Detections(torch.tensor(a[:, :4], dtype=torch.float32), torch.tensor(a[:, 4], dtype=torch.float32),
                              torch.tensor(a[:, 5], dtype=torch.int64),
                              None if ids is None else torch.tensor(ids[t], dtype=torch.int64).reshape(-1)))
    return out


def _ids(out):
    return [d.track_ids.tolist() for d in out]


def random_stream(seed, num_frames=30):
    """Objects of 3 classes drifting, with misses, duplicates and clutter."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 300, (5, 2))
    vel = rng.normal(0, 4, (5, 2))
    cls = rng.integers(0, 3, 5)
    frames = []
    for t in range(num_frames):
        f = []
        for k in range(5):
            if rng.random() < 0.2:
                continue
            xy = pos[k] + vel[k] * t + rng.normal(0, 2, 2)
            f.append((*xy, *(xy + 40), float(rng.uniform(0.2, 1.0)), int(cls[k])))
        for _ in range(int(rng.integers(0, 3))):
            xy = rng.uniform(0, 400, 2)
            f.append((*xy, *(xy + rng.uniform(10, 60, 2)), float(rng.uniform(0, 0.7)), int(rng.integers(0, 3))))
        frames.append(f)
    return _dets(frames)


# ---------------------------------------------------------------- online tracker

def test_tube_with_a_missed_frame_keeps_its_id():
    frames = _dets([[(0, 0, 10, 10, 0.9, 0)], [(1, 0, 11, 10, 0.6, 0)], [], [(2, 0, 12, 10, 0.7, 0)]])
    assert _ids(link_video(frames, 'online')) == [[0], [0], [], [0]]
    # with no missed frame allowed the track ends at the empty frame and a new one starts
    assert _ids(link_video(frames, 'online', tracker=IoUTracker(max_missed=0))) == [[0], [0], [], [1]]


def test_track_ends_after_max_missed_frames():
    box = [(0, 0, 10, 10, 0.9, 0)]
    frames = _dets([box] + [[]] * 3 + [box])
    assert _ids(link_video(frames, 'online', tracker=IoUTracker(max_missed=3)))[-1] == [0]
    assert _ids(link_video(frames, 'online', tracker=IoUTracker(max_missed=2)))[-1] == [1]


def test_crossing_tubes_keep_their_ids():
    # A moves right, B left, same class; they overlap (IoU 0.5) at frame 2
    a = [(10 * t, 0, 10 * t + 30, 30, 0.9, 0) for t in range(5)]
    b = [(40 - 10 * t, 10, 70 - 10 * t, 40, 0.8, 0) for t in range(5)]
    for motion in (False, True):
        out = link_video(_dets([[a[t], b[t]] for t in range(5)]), 'online', tracker=IoUTracker(motion=motion))
        assert _ids(out) == [[0, 1]] * 5


def test_motion_model_follows_a_fast_object():
    # 20 px box: a first step of 6 px (IoU 0.54 >= 0.3), then 12 px per frame (IoU 0.25 < 0.3).
    # The constant velocity (6, then 12 px/frame) predicts within 6 px, so the track holds; the
    # last box alone loses it at every step.
    xs = [0, 6, 18, 30, 42, 54]
    frames = _dets([[(x, 0, x + 20, 20, 0.9, 0)] for x in xs])
    assert _ids(link_video(frames, 'online', tracker=IoUTracker(motion=True))) == [[0]] * 6
    assert _ids(link_video(frames, 'online', tracker=IoUTracker(motion=False))) == [[0], [0], [1], [2], [3], [4]]


def test_duplicate_and_low_scores():
    frames = _dets([[(0, 0, 20, 20, 0.9, 0)],
                    [(0, 0, 20, 20, 0.9, 0), (3, 3, 23, 23, 0.3, 0), (2, 2, 22, 22, 0.6, 0)],
                    [(0, 0, 20, 20, 0.05, 0)]])
    # frame 1: the best-overlapping box continues the track; the 0.3 duplicate is below start_score
    # (-1); the 0.6 one starts a track. Frame 2: 0.05 < match_score: not tracked.
    assert _ids(link_video(frames, 'online')) == [[0], [0, -1, 1], [-1]]


def test_classes_do_not_share_tracks():
    frames = _dets([[(0, 0, 20, 20, 0.9, 0)], [(0, 0, 20, 20, 0.9, 1)], [(0, 0, 20, 20, 0.9, 0)]])
    assert _ids(link_video(frames, 'online')) == [[0], [1], [0]]


def test_class_present_in_some_frames_only_and_empty_frames():
    frames = _dets([[(0, 0, 9, 9, 0.9, 0)], [], [(0, 0, 9, 9, 0.9, 0), (50, 50, 70, 70, 0.5, 3)],
                    [(0, 0, 9, 9, 0.9, 0), (51, 50, 71, 70, 0.7, 3)], []])
    out = link_video(frames, 'online')
    assert _ids(out) == [[0], [], [0, 1], [0, 1], []]
    assert out[1].track_ids.dtype == torch.int64 and out[1].track_ids.shape == (0,)


def test_online_is_causal():
    """The ids of frames 0..t never change when later frames are appended."""
    frames = random_stream(0, 25)
    full = _ids(link_video(frames, 'online'))
    for t in range(len(frames)):
        assert _ids(link_video(frames[:t + 1], 'online')) == full[:t + 1]


def test_streaming_reset_and_replay_give_the_same_ids():
    frames = random_stream(1, 25)
    tr = IoUTracker()
    first = [tr.update(d).track_ids.tolist() for d in frames]
    assert tr.num_live <= len(set(i for f in first for i in f if i >= 0))
    tr.reset()
    assert tr.num_live == 0
    assert [tr.update(d).track_ids.tolist() for d in frames] == first
    # restarting the stream at frame 10 equals a fresh tracker started there
    tr.reset()
    restart = [tr.update(d).track_ids.tolist() for d in frames[10:]]
    assert restart == _ids(link_video(frames[10:], 'online'))


def test_ended_tracks_are_dropped():
    tr = IoUTracker(max_missed=2)
    for t in range(50):  # a new object every frame, each seen once
        tr.update(_dets([[(100 * t, 0, 100 * t + 10, 10, 0.9, 0)]])[0])
    assert tr.num_live == 3 and tr.live_ids() == [47, 48, 49]


@pytest.mark.parametrize('seed', range(4))
def test_invariants_on_random_streams(seed):
    frames = random_stream(seed)
    for mode in ('online', 'seqnms'):
        out = link_video(frames, mode)
        labels_of = {}
        for d_in, d in zip(frames, out):
            ids = d.track_ids.tolist()
            assert d.track_ids.dtype == torch.int64 and len(ids) == len(d)
            tracked = [i for i in ids if i >= 0]
            assert len(tracked) == len(set(tracked)), 'a track id twice in one frame'
            for i, c in zip(ids, d.labels.tolist()):
                if i >= 0:
                    assert labels_of.setdefault(i, c) == c, 'a track changes class'
            if mode == 'online':  # every box kept, unchanged
                assert torch.equal(d.boxes, d_in.boxes) and torch.equal(d.scores, d_in.scores)
            else:                 # every kept box has exactly one tube
                assert min(ids, default=0) >= 0
        if mode == 'online':      # ids 0, 1, 2, ... in order of creation
            order = []
            for d in out:
                order += [i for i in d.track_ids.tolist() if i >= 0 and i not in order]
            assert order == list(range(len(order)))


# ---------------------------------------------------------------- entry point and bad input

def test_mode_none_returns_the_input():
    frames = random_stream(2, 5)
    out = link_video(frames, 'none')
    assert all(a is b for a, b in zip(out, frames)) and out[0].track_ids is None


@pytest.mark.parametrize('make,message', [
    (lambda d: link_video(d, 'kalman'), "unknown link mode 'kalman'"),
    (lambda d: link_video(d, 'seqnms', rescore='mean'), "unknown Seq-NMS rescoring 'mean'"),
    (lambda d: link_video(d[:1] + [Detections(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, dtype=torch.int64))],
                          'online'), 'frame 1: boxes must have shape (n, 4), got (2, 3)'),
    (lambda d: link_video([Detections(torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64))],
                          'seqnms'), 'frame 0: scores must have shape (2,)'),
    (lambda d: link_video([Detections(torch.full((1, 4), float('nan')), torch.ones(1),
                                      torch.zeros(1, dtype=torch.int64))], 'seqnms'), 'must be finite'),
    (lambda d: link_video([Detections(torch.tensor([[5., 0, 0, 5]]), torch.ones(1),
                                      torch.zeros(1, dtype=torch.int64))], 'seqnms'), 'x2 >= x1'),
    (lambda d: link_video(['boxes'], 'online'), 'expected viddet.structures.Detections'),
    (lambda d: link_video(d, 'seqnms', min_path_score=0), 'min_path_score must be > 0'),
    (lambda d: IoUTracker(match_iou=1.5), 'match_iou must be in [0, 1]'),
    (lambda d: IoUTracker().update(Detections(torch.zeros(4), torch.zeros(1), torch.zeros(1, dtype=torch.int64))),
     'frame 0: boxes must have shape (n, 4), got (4,)'),
])
def test_bad_input_raises_vid_det_error(make, message):
    with pytest.raises(VidDetError, match=None) as e:
        make(random_stream(3, 3))
    assert message in str(e.value)


def test_detections_stay_backward_compatible():
    d = Detections(torch.zeros(2, 4), torch.ones(2), torch.zeros(2, dtype=torch.int64))
    assert d.track_ids is None and d.to('cpu').track_ids is None
    d = Detections(torch.zeros(2, 4), torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.tensor([3, -1]))
    assert d.to('cpu').track_ids.tolist() == [3, -1]
    assert Detections.empty().track_ids is None
    e = Detections.empty(with_tracks=True)
    assert len(e) == 0 and e.track_ids.shape == (0,) and e.track_ids.dtype == torch.int64


def test_seqnms_keeps_input_dtype_and_device():
    frames = random_stream(4, 6)
    for d_in, d in zip(frames, link_video(frames, 'seqnms')):
        assert d.scores.dtype == torch.float32 and d.boxes.dtype == torch.float32 and d.labels.dtype == torch.int64
        assert d.boxes.device == d_in.boxes.device


# ---------------------------------------------------------------- identity metrics

def test_identity_metrics_hand_computed():
    # one object over 4 frames; hypothesis 0 covers frames 0-1, hypothesis 1 frames 2-3, and a
    # false positive (id 2) in frame 1. CLEAR: 4 matches, 1 FP, 0 misses, 1 switch -> MOTA 0.5.
    # IDF1: object <-> hypothesis 0 (2 frames) -> IDTP 2, IDF1 = 2 * 2 / (4 + 5).
    obj = (0, 0, 10, 10, 1, 0)
    gt = _dets([[obj]] * 4, ids=[[7]] * 4)
    pred = _dets([[obj], [obj, (50, 50, 60, 60, 0.9, 0)], [obj], [obj]], ids=[[0], [0, 2], [1], [1]])
    m = identity_metrics(gt, pred)
    assert (m.num_gt, m.num_pred, m.matches, m.misses, m.false_positives, m.id_switches, m.idtp) == (4, 5, 4, 0, 1, 1, 2)
    assert m.mota == pytest.approx(0.5) and m.idf1 == pytest.approx(4 / 9)
    assert m.idp == pytest.approx(2 / 5) and m.idr == pytest.approx(2 / 4)
    total = sum([m, m], IdentityMetrics())
    assert total.num_gt == 8 and total.mota == pytest.approx(0.5)


def test_identity_keeps_a_still_valid_match():
    # frame 1: hypothesis 1 overlaps the object better (IoU 1) than its hypothesis 0 (IoU 0.6), but
    # CLEAR MOT keeps the existing correspondence: no switch, hypothesis 1 is a false positive.
    obj = (0, 0, 10, 10, 1, 0)
    near = (0, 0, 10, 6, 1, 0)  # IoU 0.6 with obj
    gt = _dets([[obj], [obj]], ids=[[1], [1]])
    pred = _dets([[near], [near, obj]], ids=[[0], [0, 1]])
    m = identity_metrics(gt, pred)
    assert (m.matches, m.false_positives, m.id_switches) == (2, 1, 0)


def test_identity_class_aware_min_score_and_untracked():
    obj = (0, 0, 10, 10, 1, 0)
    gt = _dets([[obj], [obj]], ids=[[1], [1]])
    pred = _dets([[(0, 0, 10, 10, 0.9, 1)], [(0, 0, 10, 10, 0.2, 0), (0, 0, 10, 10, 0.9, 0)]], ids=[[0], [3, -1]])
    m = identity_metrics(gt, pred, min_score=0.5)   # frame 0 wrong class; frame 1: low score, untracked
    assert (m.num_pred, m.matches, m.misses, m.false_positives) == (1, 0, 2, 1)
    m = identity_metrics(gt, pred, class_aware=False)
    assert (m.num_pred, m.matches, m.id_switches) == (2, 2, 1)
    with pytest.raises(VidDetError, match='track_ids are missing'):
        identity_metrics(_dets([[obj]]), pred[:1])
    with pytest.raises(VidDetError, match='1 ground-truth frames but 2'):
        identity_metrics(gt[:1], pred)
