"""COCO AP50 (MMTracking's bbox_mAP_50) against direct pycocotools and hand-computed values."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from viddet import VidDetError
from viddet.evaluation.coco import coco_evaluate


def random_set(seed, n_img=25, n_cat=4):
    rng = np.random.default_rng(seed)
    ann = dict(categories=[dict(id=i + 1, name=f'c{i}') for i in range(n_cat)], images=[], annotations=[])
    res = []
    for i in range(n_img):
        ann['images'].append(dict(id=i + 1, file_name=f'{i}.jpg', width=640, height=480))
        for _ in range(rng.integers(0, 4) if i % 5 else 0):  # some frames without objects
            x, y, w, h = (float(v) for v in (rng.uniform(0, 500), rng.uniform(0, 400), rng.uniform(4, 140), rng.uniform(4, 80)))
            c = int(rng.integers(1, n_cat + 1))
            ann['annotations'].append(dict(id=len(ann['annotations']) + 1, image_id=i + 1, category_id=c,
                                           bbox=[x, y, w, h], area=w * h, iscrowd=False))
            for _ in range(rng.integers(0, 3)):
                res.append(dict(image_id=i + 1, category_id=c if rng.random() < 0.8 else int(rng.integers(1, n_cat + 1)),
                                bbox=[x + rng.normal(0, 5), y + rng.normal(0, 5), w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)],
                                score=float(rng.random())))
        for _ in range(rng.integers(0, 3)):
            res.append(dict(image_id=i + 1, category_id=int(rng.integers(1, n_cat + 1)),
                            bbox=[float(rng.uniform(0, 500)), float(rng.uniform(0, 400)), 30.0, 30.0], score=float(rng.random())))
    return ann, res


def direct_pycocotools(ann_path, res):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        dt = gt.loadRes(json.loads(json.dumps(res)))
        ev = COCOeval(gt, dt, 'bbox')
        ev.params.catIds = gt.getCatIds()
        ev.params.imgIds = gt.getImgIds()
        ev.params.maxDets = [100, 300, 1000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_agrees_with_pycocotools(tmp_path, seed):
    ann, res = random_set(seed)
    p = tmp_path / 'ann.json'
    p.write_text(json.dumps(ann))
    ref = direct_pycocotools(p, res)
    r = coco_evaluate(res, p)
    np.testing.assert_array_equal(np.array(r.stats), ref.stats)
    assert r.ap50 == ref.stats[1]
    assert 0 < r.ap50 < 1
    # per class AP50 from the precision array; their mean is the overall AP50
    prec = ref.eval['precision'][0, :, :, 0, -1]
    for k, name in enumerate(f'c{i}' for i in range(4)):
        p_k = prec[:, k][prec[:, k] > -1]
        assert r.per_class_ap50[name] == pytest.approx(p_k.mean() if p_k.size else None)
    vals = [v for v in r.per_class_ap50.values() if v is not None]
    assert np.mean(vals) == pytest.approx(r.ap50)
    # the result dicts are left untouched (pycocotools' loadRes mutates what it gets)
    assert set(res[0]) == {'image_id', 'category_id', 'bbox', 'score'}


def test_hand_computed_half_recall(tmp_path):
    # two objects, only one detected: precision 1 for recall <= 0.5 -> 51 of 101 recall points
    ann = dict(categories=[dict(id=1, name='a')],
               images=[dict(id=1, file_name='1.jpg', width=100, height=100), dict(id=2, file_name='2.jpg', width=100, height=100)],
               annotations=[dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 20, 20], area=400, iscrowd=0),
                            dict(id=2, image_id=1, category_id=1, bbox=[50, 50, 20, 20], area=400, iscrowd=0)])
    r = coco_evaluate([dict(image_id=1, category_id=1, bbox=[10, 10, 20, 20], score=0.9)], ann)
    assert r.ap50 == pytest.approx(51 / 101)
    # ground truth as detections: 1.0; image 2 (no objects) contributes nothing
    r = coco_evaluate([dict(image_id=a['image_id'], category_id=1, bbox=a['bbox'], score=1.0) for a in ann['annotations']], ann)
    assert r.ap50 == pytest.approx(1.0) and r.stats[0] == pytest.approx(1.0)
    # a false positive on the empty frame ranked first: precision 1/2 at recall .5, 2/3 at recall 1
    res = [dict(image_id=2, category_id=1, bbox=[0, 0, 10, 10], score=0.99)] + \
          [dict(image_id=1, category_id=1, bbox=a['bbox'], score=0.5) for a in ann['annotations']]
    assert coco_evaluate(res, ann).ap50 == pytest.approx(2 / 3)
    assert coco_evaluate([], ann).ap50 == 0.0


def test_unknown_image_is_named(tmp_path):
    ann, res = random_set(0)
    with pytest.raises(VidDetError, match='result entry 0 has image_id 999'):
        coco_evaluate([dict(res[0], image_id=999)] + res, ann)
    bad = tmp_path / 'a.json'
    bad.write_text('{"images": ')
    with pytest.raises(VidDetError, match=r'a\.json: not valid JSON'):
        coco_evaluate(res, bad)
