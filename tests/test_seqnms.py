"""Seq-NMS (viddet.linking.seqnms): FGFA's own outputs (fixtures), a plain second implementation on
random cases, and hand-computed cases."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from viddet.linking.link import link_video
from viddet.linking.iou import iou_plus1
from viddet.linking.seqnms import seq_nms, seq_nms_class
from viddet.structures import Detections

from conftest import SHARED

FIXTURE_DIR = Path(os.environ.get('VIDDET_SEQNMS_DIR', SHARED / 'parity' / 'seqnms'))
FIXTURES = sorted(FIXTURE_DIR.glob('*.json')) if FIXTURE_DIR.is_dir() else []


# ---------------------------------------------------------------- oracle: the algorithm, plainly

def _iou_row(b, others):
    area = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    areas = (others[:, 2] - others[:, 0] + 1) * (others[:, 3] - others[:, 1] + 1)
    w = np.maximum(0.0, np.minimum(b[2], others[:, 2]) - np.maximum(b[0], others[:, 0]) + 1)
    h = np.maximum(0.0, np.minimum(b[3], others[:, 3]) - np.maximum(b[1], others[:, 1]) + 1)
    inter = w * h
    return inter / (area + areas - inter)


def oracle_class(boxes, scores, rescore='avg', link_iou=0.5, sup_iou=0.3, min_sum=0.01):
    """Seq-NMS of one class written directly from the algorithm: links as sets of pairs, the whole
    dynamic programme recomputed with Python loops after every path."""
    num_f = len(boxes)
    state = [['free'] * len(s) for s in scores]  # free | path | gone
    links = [{(i, j) for i in range(len(boxes[t])) for j in range(len(boxes[t + 1]))
              if _iou_row(boxes[t][i], boxes[t + 1][j:j + 1])[0] >= link_iou} for t in range(num_f - 1)]
    new = [[float(x) for x in s] for s in scores]
    pid = [[-1] * len(s) for s in scores]
    n_paths = 0
    while sum(len(x) for x in links) > 0:
        best_val, best_end, val, back = -1.0, None, {}, {}
        for t in range(num_f):
            for j in range(len(boxes[t])):
                v, pred = (float(scores[t][j]) if state[t][j] == 'free' else 0.0), -1
                for i in range(len(boxes[t - 1]) if t else 0):
                    if (i, j) in links[t - 1] and val[(t - 1, i)] + scores[t][j] > v:
                        v, pred = val[(t - 1, i)] + scores[t][j], i
                val[(t, j)], back[(t, j)] = v, pred
                if v > best_val:
                    best_val, best_end = v, (t, j)
        if best_end is None or best_val < min_sum:
            break
        path = [best_end]
        while back[path[-1]] != -1:
            t, j = path[-1]
            path.append((t - 1, back[(t, j)]))
        path.reverse()
        value = {'avg': best_val / len(path), 'max': max(scores[t][j] for t, j in path), 'none': None}[rescore]
        for t, j in path:
            new[t][j] = new[t][j] if value is None else value
            pid[t][j] = n_paths
        n_paths += 1
        for t, j in path:
            ov = _iou_row(boxes[t][j], boxes[t])
            for d in range(len(boxes[t])):
                if state[t][d] == 'free' and (ov[d] >= sup_iou or d == j):
                    state[t][d] = 'path' if d == j else 'gone'
                    if t < num_f - 1:
                        links[t] = {(i, k) for i, k in links[t] if i != d}
                    if t > 0:
                        links[t - 1] = {(i, k) for i, k in links[t - 1] if k != d}
    keep = [np.array([s != 'gone' for s in st], dtype=bool) for st in state]
    return keep, [np.array(x, dtype=np.float64) for x in new], [np.array(x, dtype=np.int64) for x in pid]


def random_video(rng, max_frames=8, max_boxes=6, classes=1):
    num_f = int(rng.integers(1, max_frames + 1))
    centres = rng.uniform(0, 100, (3, 2))
    boxes, scores, labels = [], [], []
    for _ in range(num_f):
        n = int(rng.integers(0, max_boxes + 1))
        xy = centres[rng.integers(0, 3, n)] + rng.normal(0, 6, (n, 2))
        boxes.append(np.round(np.concatenate([xy, xy + rng.uniform(20, 40, (n, 2))], 1)))
        # few distinct scores: many ties in the path sums
        scores.append(rng.choice([0.0, 0.005, 0.1, 0.2, 0.3, 0.5], n) if rng.random() < 0.5
                      else np.round(rng.random(n), 2))
        labels.append(rng.integers(0, classes, n))
    return boxes, scores, labels


@pytest.mark.parametrize('rescore', ['avg', 'max', 'none'])
def test_matches_plain_implementation_on_random_videos(rescore):
    rng = np.random.default_rng(0)
    for _ in range(150):
        boxes, scores, _ = random_video(rng)
        k1, s1, p1 = oracle_class(boxes, scores, rescore)
        k2, s2, p2 = seq_nms_class(boxes, scores, rescore)
        for t in range(len(boxes)):
            np.testing.assert_array_equal(k2[t], k1[t])
            np.testing.assert_array_equal(s2[t], s1[t])
            np.testing.assert_array_equal(p2[t], p1[t])


def test_small_chunks_give_the_same_links(monkeypatch):
    """The vectorised IoU runs over chunks of frames; one frame per chunk must not change anything."""
    import viddet.linking.seqnms_paths as mod
    rng = np.random.default_rng(1)
    cases = [random_video(rng, max_frames=10, max_boxes=8) for _ in range(40)]
    ref = [seq_nms_class(b, s) for b, s, _ in cases]
    monkeypatch.setattr(mod, '_CHUNK', 1)
    for (b, s, _), r in zip(cases, ref):
        got = seq_nms_class(b, s)
        for x, y in zip(got, r):
            for xt, yt in zip(x, y):
                np.testing.assert_array_equal(xt, yt)


def test_multiclass_is_per_class_with_documented_tube_ids():
    rng = np.random.default_rng(2)
    for _ in range(40):
        boxes, scores, labels = random_video(rng, classes=3)
        keep, new, tubes = seq_nms(boxes, scores, labels)
        expect_keep = [np.zeros(len(s), dtype=bool) for s in scores]
        expect_score = [np.array(s, dtype=np.float64) for s in scores]
        expect_tube = [np.full(len(s), -1) for s in scores]
        next_id = 0
        for c in sorted(set(np.concatenate(labels).tolist())):
            idx = [np.flatnonzero(lab == c) for lab in labels]
            k, s, p = oracle_class([b[i] for b, i in zip(boxes, idx)], [x[i] for x, i in zip(scores, idx)])
            for t, i in enumerate(idx):
                expect_keep[t][i], expect_score[t][i] = k[t], s[t]
                expect_tube[t][i] = np.where(p[t] >= 0, p[t] + next_id, -1)
            next_id += max([int(x.max()) + 1 for x in p if len(x)] + [0])
        for t in range(len(boxes)):
            lone = expect_keep[t] & (expect_tube[t] < 0)
            expect_tube[t][lone] = next_id + np.arange(lone.sum())
            next_id += int(lone.sum())
            np.testing.assert_array_equal(keep[t], np.flatnonzero(expect_keep[t]))
            np.testing.assert_array_equal(new[t], expect_score[t][keep[t]])
            np.testing.assert_array_equal(tubes[t], expect_tube[t][keep[t]])


def test_iou_plus1_hand_computed():
    a = np.array([[0., 0., 9., 9.]])          # 10 x 10 pixels with the +1 convention
    b = np.array([[5., 0., 14., 9.], [10., 0., 19., 9.], [0., 0., 9., 9.]])
    np.testing.assert_allclose(iou_plus1(a, b), [[50 / 150, 0.0, 1.0]])


# ---------------------------------------------------------------- FGFA's own outputs

def _load_frames(frames):
    return ([np.array(f['boxes'], dtype=np.float64).reshape(-1, 4) for f in frames],
            [np.array(f['scores'], dtype=np.float64) for f in frames],
            [np.array(f['labels'], dtype=np.int64) for f in frames])


def _per_class_sets(boxes, scores, labels):
    out = {}
    for b, s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        out.setdefault(c, []).append((tuple(b), s))
    return {c: sorted(v) for c, v in out.items()}


def _assert_same_kept(boxes, scores, labels, expected, where):
    exp = _per_class_sets(np.array(expected['boxes']).reshape(-1, 4), np.array(expected['scores']),
                          np.array(expected['labels']))
    got = _per_class_sets(boxes, scores, labels)
    assert sorted(got) == sorted(exp), f'{where}: classes kept differ'
    for c in exp:
        assert [b for b, _ in got[c]] == [b for b, _ in exp[c]], f'{where}: class {c}: kept boxes differ'
        np.testing.assert_allclose([s for _, s in got[c]], [s for _, s in exp[c]], rtol=0, atol=1e-9,
                                   err_msg=f'{where}: class {c}')


@pytest.mark.parametrize('path', FIXTURES or [None], ids=[p.stem for p in FIXTURES] or ['absent'])
def test_fgfa_fixtures(path):
    if path is None:
        pytest.skip(f'no Seq-NMS fixtures in {FIXTURE_DIR} (set VIDDET_SEQNMS_DIR or put ../shared beside the repository)')
    case = json.loads(path.read_text())
    boxes, scores, labels = _load_frames(case['input']['frames'])
    keep, new, tubes = seq_nms(boxes, scores, labels)
    assert len(keep) == len(case['expected']['frames'])
    for t, exp in enumerate(case['expected']['frames']):
        _assert_same_kept(boxes[t][keep[t]], new[t], labels[t][keep[t]], exp, f'{path.name} frame {t}')
    # the same through the Detections entry point (float64 tensors keep the precision)
    dets = [Detections(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(lab))
            for b, s, lab in zip(boxes, scores, labels)]
    linked = link_video(dets, 'seqnms')
    last = {}   # tube id -> (label, last frame)
    for t, (d, exp) in enumerate(zip(linked, case['expected']['frames'])):
        _assert_same_kept(d.boxes.numpy(), d.scores.numpy(), d.labels.numpy(), exp, f'{path.name} frame {t}')
        ids = d.track_ids.tolist()
        assert len(ids) == len(d) and len(set(ids)) == len(ids) and min(ids, default=0) >= 0
        for i, c in zip(ids, d.labels.tolist()):
            prev = last.get(i)
            assert prev is None or prev == (c, t - 1), 'a tube has one class and runs over consecutive frames'
            last[i] = (c, t)


# ---------------------------------------------------------------- hand-computed cases

def _dets(frames):
    """frames: per frame a list of (x1, y1, x2, y2, score, label)."""
    out = []
    for f in frames:
        a = np.array(f, dtype=np.float64).reshape(-1, 6)
        out.append(Detections(torch.tensor(a[:, :4], dtype=torch.float32), torch.tensor(a[:, 4], dtype=torch.float32),
                              torch.tensor(a[:, 5], dtype=torch.int64)))
    return out


@pytest.mark.parametrize('rescore,expected', [('avg', [0.6, 0.6, 0.6]), ('max', [0.9, 0.9, 0.9]),
                                              ('none', [0.9, 0.6, 0.3])])
def test_rescoring_variants(rescore, expected):
    frames = _dets([[(0, 0, 9, 9, s, 0)] for s in (0.9, 0.6, 0.3)])
    out = link_video(frames, 'seqnms', rescore=rescore)
    assert [d.scores.tolist() for d in out] == [[pytest.approx(e)] for e in expected]
    assert [d.track_ids.tolist() for d in out] == [[0], [0], [0]]


def test_missed_frame_splits_the_tube_and_stops_when_no_link_is_left():
    # frames 0, 1 linked; frame 2 empty; frame 3 alone. After the first path no link is left, so the
    # original stops: the frame-3 box keeps its score and becomes a tube of its own.
    frames = _dets([[(0, 0, 9, 9, 0.9, 0)], [(1, 0, 10, 9, 0.6, 0)], [], [(0, 0, 9, 9, 0.3, 0)]])
    out = link_video(frames, 'seqnms')
    assert [len(d) for d in out] == [1, 1, 0, 1]
    assert out[0].scores.item() == pytest.approx(0.75) and out[1].scores.item() == pytest.approx(0.75)
    assert out[3].scores.item() == pytest.approx(0.3)
    assert [d.track_ids.tolist() for d in out] == [[0], [0], [], [1]]
    assert out[2].track_ids.shape == (0,) and out[2].boxes.shape == (0, 4)


def test_crossing_tubes():
    # A moves right, B left (y offset 10), 30 x 30 boxes; at frame 2 they overlap (IoU 0.51 >= 0.3):
    # A (sum 4.5) is taken first and suppresses B's frame-2 box, so B splits into frames 0-1 and 3-4.
    a = [(10 * t, 0, 10 * t + 30, 30, 0.9, 0) for t in range(5)]
    b = [(40 - 10 * t, 10, 70 - 10 * t, 40, s, 0) for t, s in enumerate((0.8, 0.6, 0.7, 0.5, 0.4))]
    out = link_video(_dets([[a[t], b[t]] for t in range(5)]), 'seqnms')
    assert [len(d) for d in out] == [2, 2, 1, 2, 2]
    assert [d.track_ids.tolist() for d in out] == [[0, 1], [0, 1], [0], [0, 2], [0, 2]]
    np.testing.assert_allclose(torch.cat([d.scores for d in out]).numpy(),
                               [0.9, 0.7, 0.9, 0.7, 0.9, 0.9, 0.45, 0.9, 0.45], atol=1e-6)


def test_duplicate_box_is_suppressed():
    frames = _dets([[(0, 0, 20, 20, 0.9, 0)], [(0, 0, 20, 20, 0.9, 0), (1, 1, 21, 21, 0.8, 0)],
                    [(0, 0, 20, 20, 0.9, 0)]])
    out = link_video(frames, 'seqnms')
    assert [len(d) for d in out] == [1, 1, 1]
    assert out[1].boxes.tolist() == [[0, 0, 20, 20]]
    assert [d.track_ids.tolist() for d in out] == [[0], [0], [0]]


def test_class_present_in_some_frames_only():
    frames = _dets([[(0, 0, 9, 9, 0.9, 0)], [(0, 0, 9, 9, 0.9, 0), (50, 50, 70, 70, 0.5, 3)],
                    [(0, 0, 9, 9, 0.9, 0), (51, 50, 71, 70, 0.7, 3)], [(0, 0, 9, 9, 0.9, 0)]])
    out = link_video(frames, 'seqnms')
    assert [d.labels.tolist() for d in out] == [[0], [0, 3], [0, 3], [0]]
    assert [d.track_ids.tolist() for d in out] == [[0], [0, 1], [0, 1], [0]]
    assert out[1].scores[1].item() == pytest.approx(0.6) and out[2].scores[1].item() == pytest.approx(0.6)


def test_class_without_links_is_left_unchanged():
    # two overlapping boxes in one frame, nothing linked: the original stops before any path
    frames = _dets([[(0, 0, 20, 20, 0.9, 0), (1, 1, 21, 21, 0.8, 0)], [(100, 100, 120, 120, 0.5, 0)]])
    out = link_video(frames, 'seqnms')
    assert [len(d) for d in out] == [2, 1]
    assert [d.track_ids.tolist() for d in out] == [[0, 1], [2]]
    assert out[0].scores.tolist() == pytest.approx([0.9, 0.8])


def test_single_frame_and_empty_video():
    assert link_video([], 'seqnms') == []
    out = link_video(_dets([[(0, 0, 9, 9, 0.9, 0)]]), 'seqnms')
    assert out[0].track_ids.tolist() == [0] and out[0].scores.tolist() == pytest.approx([0.9])


def test_nms_plus1_hand_computed():
    from viddet.linking.iou import nms_plus1
    # A-B and B-C overlap (IoU 50/150 = 0.33 > 0.3 with the +1 convention), A-C do not: B goes, C stays
    boxes = np.array([[0., 0., 9., 9.], [5., 0., 14., 9.], [10., 0., 19., 9.]])
    assert nms_plus1(boxes, np.array([0.9, 0.8, 0.7]), 0.3).tolist() == [0, 2]
    assert nms_plus1(boxes, np.array([0.9, 0.8, 0.7]), 0.34).tolist() == [0, 1, 2]
    # equal scores: the later box is visited first (argsort()[::-1] of a stable sort)
    assert nms_plus1(boxes[:1].repeat(2, 0), np.array([0.5, 0.5]), 0.3).tolist() == [1]


def test_frame_nms_after_seqnms():
    # no link: Seq-NMS leaves both boxes; FGFA's evaluation NMS (0.3) then removes the weaker one
    frames = _dets([[(0, 0, 20, 20, 0.9, 0), (1, 1, 21, 21, 0.8, 0), (1, 1, 21, 21, 0.8, 1)],
                    [(100, 100, 120, 120, 0.5, 0)]])
    out = link_video(frames, 'seqnms', frame_nms_iou=0.3)
    assert [d.scores.tolist() for d in out] == [pytest.approx([0.9, 0.8]), pytest.approx([0.5])]
    assert out[0].labels.tolist() == [0, 1] and [d.track_ids.tolist() for d in out] == [[0, 1], [2]]
