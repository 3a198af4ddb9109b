"""Online tracker, the link_video entry point, Detections.track_ids and the identity metrics."""
import numpy as np
import pytest
import torch

from viddet import VidDetError
from viddet.evaluation.identity import IdentityMetrics, identity_metrics
from viddet.linking.link import link_video
from viddet.linking.tracker import IoUTracker
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


# ---------------------------------------------------------------- saved results: viddet eval / test --link
import json  # noqa: E402

from viddet.cli import main  # noqa: E402


def write_annotations(path, videos, categories=((1, 'airplane'), (2, 'antelope'))):
    """videos: name -> per frame a list of (x1, y1, x2, y2, category id, instance id). Returns the
    image ids per video."""
    data = dict(categories=[dict(id=c, name=n) for c, n in categories], videos=[], images=[], annotations=[])
    ids = {}
    for v, (name, frames) in enumerate(videos.items(), 1):
        data['videos'].append(dict(id=v, name=name))
        ids[name] = []
        for t, objs in enumerate(frames):
            img = len(data['images']) + 1
            ids[name].append(img)
            data['images'].append(dict(id=img, video_id=v, frame_id=t, file_name=f'{name}/{t:06d}.png',
                                       width=320, height=240))
            for x1, y1, x2, y2, c, inst in objs:
                data['annotations'].append(dict(id=len(data['annotations']) + 1, image_id=img, category_id=c,
                                                instance_id=inst, bbox=[x1, y1, x2 - x1, y2 - y1],
                                                area=(x2 - x1) * (y2 - y1), iscrowd=0))
    path.write_text(json.dumps(data))
    return ids


@pytest.fixture
def saved_run(tmp_path):
    """Two videos: in "a" object 7 (category 1) moves 2 px per frame and the detector also gives a
    duplicate 3 px off scoring 0.6; in "b" object 8 (category 2) stands still."""
    a = [[(10 + 2 * t, 10, 50 + 2 * t, 50, 1, 7)] for t in range(4)]
    b = [[(100, 100, 160, 160, 2, 8)]] * 3
    ann = tmp_path / 'ann.json'
    ids = write_annotations(ann, {'a': a, 'b': b})
    results = []
    for img, objs in zip(ids['a'], a):
        x1, y1, x2, y2, c, _ = objs[0]
        results += [dict(image_id=img, category_id=c, bbox=[x1, y1, 40, 40], score=0.9),
                    dict(image_id=img, category_id=c, bbox=[x1 + 3, y1 + 3, 40, 40], score=0.6)]
    for img in ids['b']:
        results.append(dict(image_id=img, category_id=2, bbox=[100, 100, 60, 60], score=0.8))
    res = tmp_path / 'results.json'
    res.write_text(json.dumps(results))
    return ann, res, ids, results


@pytest.mark.parametrize('link,expected', [
    # Seq-NMS removes the duplicates: every box tracked right
    ('seqnms', dict(id_switches=0, num_gt=7, num_pred=7, matches=7, false_positives=0, mota=1.0, idf1=1.0)),
    # online keeps them (a track of their own: 0.6 >= the start score): 4 false positives
    ('online', dict(id_switches=0, num_gt=7, num_pred=11, matches=7, false_positives=4, mota=1 - 4 / 7,
                    idf1=14 / 18)),
])
def test_eval_link_scores_identity_and_keeps_track_ids(link, expected, saved_run, tmp_path, capsys):
    ann, res, ids, _ = saved_run
    out = tmp_path / 'eval'
    metrics_json = tmp_path / 'm.json'
    assert main(['eval', str(res), '--ann', str(ann), '--link', link, '--out-dir', str(out), '--no-coco',
                 '--json', str(metrics_json)]) == 0
    printed = capsys.readouterr().out
    assert f'ID switches 0, MOTA {100 * expected["mota"]:.2f} %, IDF1 {100 * expected["idf1"]:.2f} %' in printed
    identity = json.loads(metrics_json.read_text())['identity']
    for k, v in expected.items():
        assert identity[k] == pytest.approx(v), k
    linked = json.loads((out / 'results.json').read_text())
    assert all('track_id' in r for r in linked)
    if link == 'seqnms':
        assert [(r['image_id'], r['track_id']) for r in linked] == [(i, 0) for i in ids['a'] + ids['b']]
    else:
        assert sorted({r['track_id'] for r in linked if r['image_id'] in ids['a']}) == [0, 1]


def test_eval_without_link_and_results_with_missing_frames(saved_run, tmp_path, capsys):
    ann, res, ids, results = saved_run
    assert main(['eval', str(res), '--ann', str(ann), '--no-coco']) == 0
    assert 'Identity' not in capsys.readouterr().out               # nothing linked: not scored
    gap = tmp_path / 'gap.json'
    gap.write_text(json.dumps([r for r in results if r['image_id'] != ids['b'][1]]))
    assert main(['eval', str(gap), '--ann', str(ann), '--link', 'seqnms', '--no-coco']) == 2
    err = capsys.readouterr().err
    assert (f'viddet eval: error: {gap}: video b, frame 1 (b/000001.png, image id {ids["b"][1]}) has no detections, '
            f'and linking needs every frame of a video (1 of 7 frames of {ann} have none') in err
    assert 'pass --allow-empty-frames' in err and 'Traceback' not in err
    assert main(['eval', str(gap), '--ann', str(ann), '--link', 'seqnms', '--no-coco', '--allow-empty-frames']) == 0
    stray = tmp_path / 'stray.json'
    stray.write_text(json.dumps(results + [dict(image_id=99, category_id=1, bbox=[0, 0, 5, 5], score=0.5)]))
    assert main(['eval', str(stray), '--ann', str(ann), '--link', 'online', '--no-coco']) == 2
    assert f'{stray}: entry {len(results)} has image_id 99, which is not in the annotation file' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['eval', str(res), '--ann', str(ann), '--link', 'tubes'])
    assert "argument --link: invalid choice: 'tubes'" in capsys.readouterr().err


@pytest.mark.parametrize('link,switches,idf1', [('online', 0, 1.0), ('seqnms', 1, 18 / 22)])
def test_viddet_test_link_records_saves_and_scores_it(link, switches, idf1, tmp_path, monkeypatch, capsys):
    """``viddet test --link`` with the scripted method (tests/scripted_method.py): its A and B are the
    annotated objects; Seq-NMS splits B at its missed frame into two tubes, one ID switch."""
    import cv2
    from scripted_method import SEQNMS_IDS, ONLINE_IDS, scripted_detector
    detector = scripted_detector()
    monkeypatch.setattr('viddet.api.detector_from_args', lambda args: detector)
    frames = [[(10 + 5 * t, 10, 60 + 5 * t, 60, 1, 1)] + ([(200 - 5 * t, 20, 260 - 5 * t, 80, 2, 2)] if t != 2 else [])
              for t in range(6)]
    ann = tmp_path / 'ann.json'
    write_annotations(ann, {'v': frames})
    (tmp_path / 'root' / 'v').mkdir(parents=True)
    for t in range(6):
        cv2.imwrite(str(tmp_path / 'root' / 'v' / f'{t:06d}.png'), np.full((240, 320, 3), 30 * t, np.uint8))
    out = tmp_path / 'out'
    assert main(['test', str(ann), '--root', str(tmp_path / 'root'), '--out-dir', str(out), '--link', link,
                 '--device', 'cpu']) == 0
    printed = capsys.readouterr().out
    assert f'ID switches {switches}, MOTA {100 * (1 - switches / 11):.2f} %, IDF1 {100 * idf1:.2f} %' in printed
    assert json.loads((out / 'run.json').read_text())['link'] == link
    saved = json.loads((out / 'results.json').read_text())
    by_frame = [[r['track_id'] for r in saved if r['image_id'] == t + 1] for t in range(6)]
    assert by_frame == (ONLINE_IDS if link == 'online' else SEQNMS_IDS)
    assert json.loads((out / 'metrics.json').read_text())['identity']['id_switches'] == switches
