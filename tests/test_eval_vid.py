"""Official ImageNet VID mAP + motion bins: hand-computed cases and a brute-force second implementation."""
import json
import math

import numpy as np
import pytest

from viddet import VidDetError
from viddet.evaluation.io import devkit_round, load_ground_truth, load_results, results_to_arrays, write_vid_txt
from viddet.evaluation.motion import MotionIoU, compute_motion_iou, motion_iou_from_mat, read_motion_iou_mat
from viddet.evaluation.report import evaluate_results
from viddet.evaluation.vid import vid_eval, voc_ap

NAMES = ['a', 'b', 'c']


def make_ann(frames, names=NAMES):
    """frames: list of lists of (label, (x1, y1, x2, y2)[, instance]) -> COCO-VID dict (one video)."""
    d = dict(categories=[dict(id=i + 1, name=n) for i, n in enumerate(names)], videos=[dict(id=1, name='v')],
             images=[], annotations=[])
    for f, objs in enumerate(frames):
        d['images'].append(dict(id=f + 1, file_name=f'v/{f:06d}.JPEG', width=1000, height=1000, frame_id=f, video_id=1))
        for o in objs:
            lab, (x1, y1, x2, y2) = o[0], o[1]
            d['annotations'].append(dict(id=len(d['annotations']) + 1, image_id=f + 1, video_id=1, category_id=lab + 1,
                                         bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), iscrowd=False,
                                         instance_id=o[2] if len(o) > 2 else len(d['annotations']) + 1))
    return d


def det(frame, label, box, score):
    x1, y1, x2, y2 = box
    return dict(image_id=frame + 1, category_id=label + 1, bbox=[x1, y1, x2 - x1, y2 - y1], score=score)


def run(frames, dets, motion=None, rounding=False):
    gt = load_ground_truth(make_ann(frames))
    d = results_to_arrays(dets, gt)
    mot = None
    if motion is not None:
        mot = MotionIoU(values=np.asarray(motion[0], float), all_values=np.asarray(motion[1], float), source='test')
    return vid_eval(gt, d, mot, devkit_rounding=rounding)


# ------------------------------------------------------------------------------------ hand-computed
def test_small_object_relaxed_threshold():
    # 10x10 object (+1 convention): thr = 100 / (20 * 20) = 0.25; a 15x15 box has IoU 100/225 = 0.444
    small = [[(0, (0, 0, 9, 9))]]
    r = run(small, [det(0, 0, (0, 0, 14, 14), 0.9)])
    assert r.plain.ap[0] == pytest.approx(1.0)
    # the same IoU on a large object (thr 0.5) is a miss
    big = [[(0, (0, 0, 99, 99))]]
    r = run(big, [det(0, 0, (0, 0, 149, 149), 0.9)])  # IoU 100^2 / 150^2 = 0.444
    assert r.plain.ap[0] == pytest.approx(0.0)
    # and exactly at the threshold (IoU == thr) counts: 0.25 threshold vs box giving IoU 0.25 exactly
    r = run(small, [det(0, 0, (0, 0, 19, 19), 0.9)])  # IoU 100 / 400
    assert r.plain.ap[0] == pytest.approx(1.0)


def test_duplicates_are_false_positives():
    frames = [[(0, (0, 0, 99, 99)), (0, (200, 200, 299, 299))]]
    dets = [det(0, 0, (0, 0, 99, 99), 0.9), det(0, 0, (2, 2, 99, 99), 0.8), det(0, 0, (200, 200, 299, 299), 0.7)]
    r = run(frames, dets)
    # tp 1,0,1  fp 0,1,0 -> rec .5 .5 1, prec 1 .5 .667 -> AP = .5 * 1 + .5 * 2/3
    assert r.plain.ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert r.map == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_greedy_takes_best_iou_and_classes_do_not_mix():
    frames = [[(0, (0, 0, 99, 99)), (0, (50, 0, 149, 99)), (1, (0, 0, 99, 99))]]
    dets = [det(0, 0, (45, 0, 144, 99), 0.9),   # overlaps both class-a objects, best is the second
            det(0, 0, (0, 0, 99, 99), 0.8),     # then takes the first
            det(0, 2, (0, 0, 99, 99), 0.95)]    # class c on the class-b object: FP of c, b missed
    r = run(frames, dets)
    assert r.plain.ap[0] == pytest.approx(1.0)
    assert r.plain.ap[1] == pytest.approx(0.0) and r.plain.npos[1] == 1
    assert math.isnan(r.plain.ap[2]) and r.plain.npos[2] == 0  # no objects of c: left out of the mean
    assert r.map == pytest.approx(0.5)
    # an unmatched ground-truth class with no detections at all gives AP 0
    r = run(frames, dets[:2])
    assert r.plain.ap[1] == 0.0


def test_voc_ap_envelope():
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(0.5 + 1 / 3)
    assert voc_ap(np.array([]), np.array([])) == 0.0


def test_motion_bins_fractional_fp_by_hand():
    # frame 0: g1 slow (0.95), g2 fast (0.5); frame 1 empty (its .mat cell reads as a single 0)
    frames = [[(0, (0, 0, 99, 99)), (0, (500, 500, 599, 599))], []]
    motion = ([0.95, 0.5], [0.95, 0.5, 0.0])
    dets = [det(1, 0, (0, 0, 99, 99), 0.95),        # empty frame: fp = empty_weight
            det(0, 0, (300, 300, 350, 350), 0.92),  # overlaps nothing: tie -> fp = share of ignored objects
            det(0, 0, (0, 0, 99, 99), 0.9),         # g1
            det(0, 0, (500, 500, 599, 599), 0.8)]   # g2
    r = run(frames, dets, motion)
    assert r.plain.ap[0] == pytest.approx(0.5)      # FP FP TP TP -> .5 * 1/3 -> envelope .5 * .5 + .5 * .5
    assert r.motion['all'].ap[0] == pytest.approx(0.5)
    # slow: fp 1/3 (empty weight), 1/2, then TP on g1, g2 ignored -> prec 1 / (1 + 5/6)
    assert r.motion['slow'].ap[0] == pytest.approx(6 / 11)
    # fast: fp 2/3, 1/2, g1 ignored (no TP/FP), TP g2 -> prec 1 / (1 + 7/6)
    assert r.motion['fast'].ap[0] == pytest.approx(6 / 13)
    assert math.isnan(r.motion['medium'].ap[0]) and r.motion['medium'].npos[0] == 0


def test_motion_bins_inclusive_bounds():
    # objects with motion IoU exactly 0.7 and 0.9 belong to two bins each
    frames = [[(0, (0, 0, 99, 99)), (0, (200, 0, 299, 99)), (0, (400, 0, 499, 99)), (0, (600, 0, 699, 99))]]
    miou = [0.7, 0.9, 0.5, 0.95]
    dets = [det(0, 0, o[1], 1.0 - 0.1 * i) for i, o in enumerate(frames[0])]
    r = run(frames, dets, (miou, miou))
    assert r.motion['fast'].npos[0] == 2      # 0.5, 0.7
    assert r.motion['medium'].npos[0] == 2    # 0.7, 0.9
    assert r.motion['slow'].npos[0] == 2      # 0.9, 0.95
    for name in ('fast', 'medium', 'slow', 'all'):
        assert r.motion[name].ap[0] == pytest.approx(1.0)
    # a miss of the 0.7 object lowers both fast and medium, not slow
    r = run(frames, dets[1:], (miou, miou))
    assert r.motion['fast'].ap[0] == pytest.approx(0.5)
    assert r.motion['medium'].ap[0] == pytest.approx(0.5)
    assert r.motion['slow'].ap[0] == pytest.approx(1.0)


def test_unmatched_fp_prefers_overlap_side():
    # ignored object of another class overlaps the detection more than the non-ignored one: fp 0
    frames = [[(1, (0, 0, 99, 99)), (0, (300, 300, 399, 399))]]
    miou = [0.95, 0.5]  # in the fast bin the class-b object is ignored
    dets = [det(0, 0, (10, 10, 99, 99), 0.9), det(0, 0, (300, 300, 399, 399), 0.8)]
    r = run(frames, dets, (miou, miou))
    assert r.motion['fast'].ap[0] == pytest.approx(1.0)   # the first det costs nothing
    assert r.plain.ap[0] == pytest.approx(0.5)            # but is a FP in the plain metric


def test_ground_truth_as_detections_scores_one(tmp_path):
    rng = np.random.default_rng(0)
    frames = []
    for f in range(30):
        objs = []
        for k in range(rng.integers(0, 4)):
            x, y = rng.integers(0, 800, 2)
            w, h = rng.integers(3, 200, 2)
            objs.append((int(rng.integers(0, 3)), (int(x), int(y), int(x + w), int(y + h)), k))
        frames.append(objs)
    ann = make_ann(frames)
    p = tmp_path / 'ann.json'
    p.write_text(json.dumps(ann))
    res = [dict(image_id=a['image_id'], category_id=a['category_id'], bbox=a['bbox'], score=0.5 + 0.01 * (i % 7))
           for i, a in enumerate(ann['annotations'])]
    m = evaluate_results(res, p, out_dir=tmp_path / 'out')
    for k in ('coco_ap50', 'vid_map', 'vid_map_slow', 'vid_map_medium', 'vid_map_fast'):
        assert m[k] is None or m[k] == pytest.approx(1.0), k
    assert m['coco_ap50'] == pytest.approx(1.0) and m['vid_map'] == pytest.approx(1.0)
    assert 'computed' in m['motion_iou_source']
    for f in ('results.json', 'detections_vid.txt', 'ap_table.txt', 'metrics.json', 'pr_vid.png', 'pr_coco_ap50.png',
              'pr_vid_slow.png', 'pr_vid_medium.png', 'pr_vid_fast.png'):
        assert (tmp_path / 'out' / f).stat().st_size > 0, f
    assert json.loads((tmp_path / 'out' / 'metrics.json').read_text())['vid_map'] == pytest.approx(1.0)
    # the devkit txt round-trips to the same metrics
    back = load_results(tmp_path / 'out' / 'detections_vid.txt', load_ground_truth(p))
    assert len(back) == len(res)
    m2 = evaluate_results(back, p, coco=False)
    assert m2['vid_map'] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ brute force
def brute_force(frames, dets, miou=None, all_values=None, ranges=None):
    """Literal loop implementation of the devkit rules (stable tie order: frame, then input)."""
    C = len(NAMES)
    gts = [[dict(label=o[0], box=[float(v) for v in o[1]]) for o in objs] for objs in frames]
    k = 0
    for objs in gts:
        for g in objs:
            w, h = g['box'][2] - g['box'][0] + 1, g['box'][3] - g['box'][1] + 1
            g['thr'] = min(0.5, w * h / ((w + 10.0) * (h + 10.0)))
            g['miou'] = miou[k] if miou is not None else 0.0
            k += 1
    per_frame = [[] for _ in frames]
    for i, d in enumerate(dets):
        x, y, w, h = d['bbox']
        per_frame[d['image_id'] - 1].append(dict(i=i, label=d['category_id'] - 1, score=d['score'],
                                                 box=[x, y, x + w, y + h]))

    def iou(a, b):
        iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
        ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
        if iw > 0 and ih > 0:
            ua = (a[2] - a[0] + 1.) * (a[3] - a[1] + 1.) + (b[2] - b[0] + 1.) * (b[3] - b[1] + 1.) - iw * ih
            return iw * ih / ua
        return 0.0

    def ap_of(flat, npos):
        out = []
        for c in range(C):
            rows = [r for r in flat if r[2] == c]
            if npos[c] <= 0:
                out.append(float('nan'))
                continue
            tp = fp = 0.0
            rec, prec = [], []
            for _, _, _, t, f in rows:
                tp += t
                fp += f
                rec.append(tp / npos[c])
                prec.append(tp / max(tp + fp, np.finfo(float).eps))
            # VOC all-points AP by explicit loops
            mrec = [0.0] + rec + [1.0]
            mpre = [0.0] + prec + [0.0]
            for j in range(len(mpre) - 2, -1, -1):
                mpre[j] = max(mpre[j], mpre[j + 1])
            out.append(sum((mrec[j + 1] - mrec[j]) * mpre[j + 1] for j in range(len(mrec) - 1) if mrec[j + 1] != mrec[j]))
        return out

    results = {}
    for name, (lo, hi) in ([('plain', (None, None))] + list((ranges or {}).items())):
        flat = []
        npos = [0] * C
        for f, objs in enumerate(gts):
            ig = [False if lo is None else (g['miou'] < lo or g['miou'] > hi) for g in objs]
            for g, gi in zip(objs, ig):
                if not gi:
                    npos[g['label']] += 1
            detected = [False] * len(objs)
            ds = sorted(per_frame[f], key=lambda d: (-d['score'], d['i']))
            for d in ds:
                best, kbest = -1.0, -1
                ov_ig = ov_nig = -1.0
                for kk, g in enumerate(objs):
                    ov = iou(d['box'], g['box'])
                    if g['label'] == d['label'] and not detected[kk] and ov >= g['thr'] and ov > best and ov > 0:
                        best, kbest = ov, kk
                    if ig[kk]:
                        ov_ig = max(ov_ig, ov)
                    else:
                        ov_nig = max(ov_nig, ov)
                if kbest >= 0:
                    detected[kbest] = True
                    t, fpv = (0.0 if ig[kbest] else 1.0), 0.0
                elif lo is None:
                    t, fpv = 0.0, 1.0
                elif (d['box'][2] - d['box'][0] + 1) * (d['box'][3] - d['box'][1] + 1) < 0:
                    t, fpv = 0.0, 0.0  # the motion script's area range [0, 1e10] drops inverted boxes
                elif ov_nig > ov_ig:
                    t, fpv = 0.0, 1.0
                elif ov_ig > ov_nig:
                    t, fpv = 0.0, 0.0
                elif not objs:
                    t, fpv = 0.0, sum(1 for v in all_values if lo <= v <= hi) / len(all_values)
                else:
                    t, fpv = 0.0, sum(ig) / len(objs)
                flat.append((d['score'], f, d['label'], t, fpv, d['i']))
        flat.sort(key=lambda r: (-r[0], r[1], r[5]))
        results[name] = ap_of([r[:5] for r in flat], npos)
    return results


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_vectorised_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    frames, dets, miou = [], [], []
    for f in range(40):
        objs = []
        for _ in range(rng.integers(0, 5) if f % 7 else 0):  # every 7th frame empty
            x, y = rng.integers(0, 300, 2)
            w, h = rng.integers(2, 80, 2)
            objs.append((int(rng.integers(0, 3)), (int(x), int(y), int(x + w), int(y + h))))
            miou.append(float(rng.choice([0.7, 0.9, rng.random(), rng.random()])))
        frames.append(objs)
        for _ in range(rng.integers(0, 12)):
            if objs and rng.random() < 0.7:
                lab, b = objs[rng.integers(len(objs))]
                b = np.array(b, float) + rng.normal(0, 6, 4)
                lab = lab if rng.random() < 0.8 else int(rng.integers(0, 3))
            else:
                x, y = rng.uniform(0, 300, 2)
                b = np.array([x, y, x + rng.uniform(2, 80), y + rng.uniform(2, 80)])
                lab = int(rng.integers(0, 3))
            score = float(np.round(rng.random(), 1))  # many ties
            dets.append(det(f, lab, b.tolist(), score))
    all_values = miou + [0.0] * sum(1 for o in frames if not o)
    ranges = {'all': (0.0, 1.0), 'fast': (0.0, 0.7), 'medium': (0.7, 0.9), 'slow': (0.9, 1.0)}
    ref = brute_force(frames, dets, miou, all_values, ranges)
    r = run(frames, dets, (miou, all_values))
    np.testing.assert_allclose(r.plain.ap, ref['plain'], rtol=1e-12, atol=1e-12)
    for name in ranges:
        np.testing.assert_allclose(r.motion[name].ap, ref[name], rtol=1e-12, atol=1e-12, err_msg=name)
    # with devkit rounding the vectorised result equals brute force on the rounded txt values
    rounded = [dict(d, score=float(f'{d["score"]:.4f}')) for d in dets]
    for d in rounded:
        x, y, w, h = d['bbox']
        x1, y1, x2, y2 = (float(f'{v:.2f}') for v in (x, y, x + w, y + h))
        d['bbox'] = [x1, y1, x2 - x1, y2 - y1]
    ref_r = brute_force(frames, rounded, miou, all_values, ranges)
    rr = run(frames, dets, (miou, all_values), rounding=True)
    np.testing.assert_allclose(rr.plain.ap, ref_r['plain'], rtol=1e-9, atol=1e-9)


def test_devkit_round_matches_format():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.random(2000), np.array([0.00005, 0.12345, 2.675, 1.005, 0.5, 0.00015]),
                        np.arange(0, 1, 0.00005)])
    for dec in (2, 4):
        expect = np.array([float(f'{v:.{dec}f}') for v in x])
        np.testing.assert_array_equal(devkit_round(x, dec), expect)


# ------------------------------------------------------------------------------------ motion IoU
def test_computed_motion_iou_by_hand():
    # one 10x10 object (+1 convention) moving 1 px right per frame: IoU(shift s) = (10 - s) / (10 + s)
    frames = [[(0, (s, 0, s + 9, 9), 7)] for s in range(3)] + [[]]
    gt = load_ground_truth(make_ann(frames))
    m = compute_motion_iou(gt, radius=10)
    np.testing.assert_allclose(m.values, [(9 / 11 + 8 / 12) / 2, 9 / 11, (9 / 11 + 8 / 12) / 2])
    assert len(m.all_values) == 4 and m.all_values[-1] == 0.0  # the empty frame counts as one 0
    m1 = compute_motion_iou(gt, radius=1)
    np.testing.assert_allclose(m1.values, [9 / 11, 9 / 11, 9 / 11])
    # an object seen in one frame only has no neighbour: 0 (fast)
    gt2 = load_ground_truth(make_ann([[(0, (0, 0, 9, 9), 1)], [(0, (0, 0, 9, 9), 2)]]))
    np.testing.assert_array_equal(compute_motion_iou(gt2).values, [0.0, 0.0])


def test_official_motion_iou_mat(shared):
    path = shared('data', 'imagenet_vid_groundtruth_motion_iou.mat')
    cells = read_motion_iou_mat(path)
    assert len(cells) == 176126
    allv = np.concatenate(cells)
    assert len(allv) == 277551  # 273,505 object values + 4,046 empty cells, each read as one 0
    assert sum(1 for c in cells if len(c) == 1 and c[0] == 0) >= 4046
    assert (allv > 0.9).mean() == pytest.approx(0.374, abs=5e-4)
    assert (allv < 0.7).mean() == pytest.approx(0.272, abs=5e-4)
    # alignment: image id g takes cell g - 1
    frames = [[(0, (0, 0, 9, 9))], [(0, (0, 0, 9, 9))], [(0, (0, 0, 9, 9))]]
    gt = load_ground_truth(make_ann(frames))
    m = motion_iou_from_mat(path, gt)
    np.testing.assert_allclose(m.values, [cells[0][0], cells[1][0], cells[2][0]])
    assert m.values[0] == pytest.approx(0.66981274)
    assert m.source.startswith('file:')
    bad = load_ground_truth(make_ann([[(0, (0, 0, 9, 9)), (1, (5, 5, 20, 20))]]))
    with pytest.raises(VidDetError, match='image id 1 has 2 objects in the annotation file but 1 motion IoU values'):
        motion_iou_from_mat(path, bad)


# ------------------------------------------------------------------------------------ malformed inputs
def test_malformed_results(tmp_path):
    ann = make_ann([[(0, (0, 0, 9, 9))]])
    p = tmp_path / 'ann.json'
    p.write_text(json.dumps(ann))
    bad = tmp_path / 'res.json'
    bad.write_text('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},')
    with pytest.raises(VidDetError, match=r'res\.json: not valid JSON'):
        load_results(bad)
    bad.write_text(json.dumps([dict(image_id=1, category_id=1, bbox=[0, 0, 5, 5], score=0.5),
                               dict(image_id=1, category_id=1, bbox=[0, 0, 5], score=0.5)]))
    with pytest.raises(VidDetError, match=r'res\.json: entry 1 has bbox \[0, 0, 5\]'):
        load_results(bad)
    bad.write_text(json.dumps([dict(image_id=1, category_id=1, bbox=[0, 0, 5, 5])]))
    with pytest.raises(VidDetError, match=r'entry 0 has no "score"'):
        load_results(bad)
    bad.write_text(json.dumps({'image_id': 1}))
    with pytest.raises(VidDetError, match='expected a JSON list'):
        load_results(bad)
    with pytest.raises(VidDetError, match='entry 0 has image_id 99, which is not in the annotation file'):
        evaluate_results([dict(image_id=99, category_id=1, bbox=[0, 0, 5, 5], score=0.5)], p, coco=False)
    with pytest.raises(VidDetError, match='entry 0 has category_id 7'):
        evaluate_results([dict(image_id=1, category_id=7, bbox=[0, 0, 5, 5], score=0.5)], p, coco=False)
    txt = tmp_path / 'd.txt'
    txt.write_text('1 1 0.5000 0 0 5 5\n1 x 0.5 0 0 5 5\n')
    with pytest.raises(VidDetError, match=r'd\.txt:2: expected'):
        load_results(txt, load_ground_truth(p))
    with pytest.raises(VidDetError, match='annotation file not found'):
        load_ground_truth(tmp_path / 'missing.json')


def test_vid_txt_format(tmp_path):
    gt = load_ground_truth(make_ann([[(0, (0, 0, 9, 9))], [(1, (0, 0, 9, 9))]]))
    res = [det(1, 1, (1.234, 2.0, 30.5, 40.25), 0.123456), det(0, 2, (0, 0, 9, 9), 0.9)]
    write_vid_txt(res, gt, tmp_path / 'x.txt')
    assert (tmp_path / 'x.txt').read_text().splitlines() == [
        '1 3 0.9000 0.00 0.00 9.00 9.00', '2 2 0.1235 1.23 2.00 30.50 40.25']


# ------------------------------------------------------------------------------------ original devkit values
def fgfa_case(seed):
    """Deterministic set: 3 videos of tracks (3 classes), empty frames, motion IoU with exact 0.7/0.9,
    detections with distinct 4-decimal scores and 2-decimal boxes (so the devkit txt is lossless)."""
    rng = np.random.default_rng(seed)
    frames, miou = [], []
    for v in range(3):
        L = int(rng.integers(15, 40))
        tracks = [(int(rng.integers(0, L // 2)), int(rng.integers(L // 2, L + 1)), int(rng.integers(0, 3)),
                   rng.uniform(0, 300, 2), rng.uniform(4, 150, 2), rng.normal(0, rng.choice([0.5, 4, 12]), 2))
                  for _ in range(int(rng.integers(1, 5)))]
        for f in range(L):
            objs = []
            for k, (s, e, c, xy, wh, vel) in enumerate(tracks):
                if s <= f < e:
                    p = xy + vel * (f - s)
                    objs.append((c, (int(p[0]), int(p[1]), int(p[0] + wh[0]), int(p[1] + wh[1])), 10 * v + k))
                    miou.append(float(rng.choice([0.7, 0.9, rng.random(), rng.random(), rng.random()])))
            frames.append(objs)
    dets = []
    for f, objs in enumerate(frames):
        for c, b, _ in objs:
            for _ in range(int(rng.integers(0, 3))):
                w, h = b[2] - b[0], b[3] - b[1]
                jb = np.round(np.array(b, float) + rng.normal(0, 0.12, 4) * [w, h, w, h], 2)
                dets.append([f, c if rng.random() < 0.85 else int(rng.integers(0, 3)), jb])
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 400, 2)
            dets.append([f, int(rng.integers(0, 3)), np.round([x, y, x + rng.uniform(3, 120), y + rng.uniform(3, 120)], 2)])
    scores = (rng.permutation(len(dets)) + 1) / 10000.0
    res = [dict(image_id=f + 1, category_id=c + 1, bbox=[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                score=float(s)) for (f, c, b), s in zip(dets, scores)]
    return frames, miou, res


# APs for classes 0..2 computed by FGFA's own lib/dataset/imagenet_vid_eval.py and imagenet_vid_eval_motion.py
# (Python-3 syntax fixes only) on fgfa_case(seed) written out as XMLs, a .mat and the devkit txt.
FGFA_ORIGINAL_AP = {
    0: {'plain': [0.4511134274189677, 0.08328627893845285, 0.1433333333333333],
        'all': [0.4511134274189677, 0.08328627893845285, 0.1433333333333333],
        'fast': [0.40233800869208075, 0.08912245180254304, 0.20404176996469087],
        'medium': [0.5558337218168693, 0.2293468825922383, 0.09933907470458642],
        'slow': [0.5330804856618413, 0.03208002759572267, 0.09182917798074548]},
    1: {'plain': [0.25409018408887213, 0.21915651696456565, 0.39808855219440403],
        'all': [0.25409018408887213, 0.21915651696456565, 0.39808855219440403],
        'fast': [0.30506151674551774, 0.2810577501783451, 0.354585205587556],
        'medium': [0.2288592951530998, 0.16570625600730324, 0.5026217771404691],
        'slow': [0.24351321053926706, 0.09387697721190172, 0.6016618488680856]},
    2: {'plain': [0.42872374362068605, 0.17703533026113674, 0.4116205630735655],
        'all': [0.42872374362068605, 0.17703533026113674, 0.4116205630735655],
        'fast': [0.3764603225580161, 0.13295202365391917, 0.39147929630054284],
        'medium': [0.45027072555939607, 0.24893028439508832, 0.3818269648624575],
        'slow': [0.5552258297265672, 0.1836022698082806, 0.4902021617141351]},
}


@pytest.mark.parametrize('seed', sorted(FGFA_ORIGINAL_AP))
def test_matches_original_fgfa_devkit(seed):
    frames, miou, res = fgfa_case(seed)
    all_values = miou + [0.0] * sum(1 for o in frames if not o)
    r = run(frames, res, (miou, all_values), rounding=True)
    exp = FGFA_ORIGINAL_AP[seed]
    np.testing.assert_allclose(r.plain.ap, exp['plain'], rtol=0, atol=1e-10)
    for name in ('all', 'fast', 'medium', 'slow'):
        got = np.where(np.isnan(r.motion[name].ap), -1.0, r.motion[name].ap)
        np.testing.assert_allclose(got, exp[name], rtol=0, atol=1e-10, err_msg=name)


def test_numpy_typed_results_are_accepted(tmp_path):
    frames = [[(0, (0, 0, 99, 99))], [(1, (10, 10, 50, 50))]]
    p = tmp_path / 'ann.json'
    p.write_text(json.dumps(make_ann(frames)))
    plain = [det(0, 0, (0, 0, 99, 99), 0.9), det(1, 1, (10, 10, 40, 50), 0.8), det(1, 0, (0, 0, 9, 9), 0.7)]
    typed = [dict(image_id=np.int64(r['image_id']), category_id=np.int32(r['category_id']),
                  bbox=np.array(r['bbox'], np.float32), score=np.float32(r['score'])) for r in plain]
    a = evaluate_results(plain, p, out_dir=tmp_path / 'a')
    b = evaluate_results(typed, p, out_dir=tmp_path / 'b')
    assert a['vid_map'] == b['vid_map'] and a['coco_ap50'] == b['coco_ap50']
    assert json.loads((tmp_path / 'b' / 'results.json').read_text())[0]['image_id'] == 1
