"""The YOLOV family's per-frame training augmentation (viddet.data.frame_augment): HSV jitter on
hand-computed pixels and against the official ``augment_hsv`` / ``TrainTransform`` outputs
(tests/fixtures/yolov_augment), each frame's own flip through the dataset, the config keys, and the
Faster R-CNN methods' one shared flip left as it was."""
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import shared_path
from viddet.config.training import config_from_dict, load_config
from viddet.data.frame_augment import HSV_GAINS, augment_frames, draw_frame_augment, hsv_jitter
from viddet.data.sequence import placed_boxes, prepare_sequence
from viddet.data.video_dataset import VideoDataset
from viddet.errors import VidDetError
from viddet.methods.yolov import YOLOV, YOLOVPP
from viddet.models.yolov_loss import frame_targets

FIXTURE = Path(__file__).parent / 'fixtures' / 'yolov_augment' / 'official_augment.npz'
REPO = Path(__file__).parent.parent
ALL_REFS = dict(num_ref_imgs=15, frame_range=100, filter_key_img=True, method='uniform')
FGFA_SAMPLER = dict(num_ref_imgs=2, frame_range=9, filter_key_img=True, method='bilateral_uniform')


class ScriptedRng(random.Random):
    """A ``random.Random`` whose ``random()`` and ``uniform()`` return given numbers, in order."""

    def __init__(self, randoms, uniforms=()):
        super().__init__(0)
        self.randoms, self.uniforms = list(randoms), list(uniforms)

    def random(self):
        return self.randoms.pop(0)

    def uniform(self, a, b):
        return self.uniforms.pop(0)


def scripted(jitter, uniforms, keep, flip):
    """The draws of one frame (draw_frame_augment's order) that give these choices."""
    return ScriptedRng([0.0 if jitter else 0.99] + [0.0 if k else 0.99 for k in keep] + [0.0 if flip else 0.99],
                       uniforms)


def tiny_video(root: Path, n_frames=16, width=80, height=60, empty=(5,)):
    """One video of textured frames (every pixel differs from its mirror), a 20 x 12 box moving right
    one pixel a frame; the frames in ``empty`` have no box."""
    ann = dict(categories=[dict(id=1, name='airplane'), dict(id=2, name='antelope')],
               videos=[dict(id=1, name='v1')], images=[], annotations=[])
    (root / 'v1').mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:height, :width]
    for f in range(n_frames):
        ann['images'].append(dict(file_name=f'v1/{f:06d}.png', height=height, width=width, id=f + 1, frame_id=f,
                                  video_id=1, is_vid_train_frame=True))
        img = np.stack([(xx * 3 + f) % 256, (yy * 4) % 256, (xx + yy * 2 + 7 * f) % 256], -1).astype(np.uint8)
        cv2.imwrite(str(root / f'v1/{f:06d}.png'), img)
        if f not in empty:
            ann['annotations'].append(dict(id=len(ann['annotations']) + 1, image_id=f + 1, video_id=1, category_id=1,
                                           instance_id=1, bbox=[f + 3, 4, 20, 12], area=240, iscrowd=False))
    return ann


def yolov_dataset(root, ann, seed, flip_ratio=0.5, hsv_prob=0.0, scale=(160, 160)):
    return VideoDataset(ann, root, ref_sampler=ALL_REFS, img_scale=scale, flip_ratio=flip_ratio,
                        rng=random.Random(seed), transform=YOLOV.train_transform,
                        per_frame_augment=YOLOV.per_frame_augment, hsv_prob=hsv_prob)


def frames_of(item):
    return [item['img']] + list(item['ref_imgs']), [item['gt_bboxes']] + list(item['ref_gt_bboxes'])


def plain_letterbox(root, item, scale=(160, 160)):
    """Each frame of an item letterboxed without augmentation, and its unflipped boxes."""
    frame_ids = [item['frame_id']] + item['ref_frame_ids']
    return [YOLOV.train_transform(cv2.imread(str(root / f'v1/{f:06d}.png')), scale)[0] for f in frame_ids], frame_ids


# ------------------------------------------------------------------------------------ HSV
def test_hsv_jitter_on_hand_computed_pixels():
    # BGR pixels and their OpenCV HSV (H = angle / 2; (12, 0, 255): 360 - 60 * 12 / 255 = 357.2 deg -> 179)
    bgr = np.array([[[12, 0, 255], [0, 0, 255], [255, 0, 0], [100, 100, 100], [250, 250, 250], [0, 0, 0]]], np.uint8)
    hsv = [[179, 255, 255], [0, 255, 255], [120, 255, 255], [0, 0, 100], [0, 0, 250], [0, 0, 0]]
    np.testing.assert_array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[0], hsv)
    expected = {
        # hue -4 wraps 0 -> 176; saturation +10 clipped at 255; value -20, clipped at 0 for black
        (-4, 10, -20): [[175, 255, 235], [176, 255, 235], [116, 255, 235], [176, 10, 80], [176, 10, 230], [176, 10, 0]],
        # hue +5 wraps 179 -> 4; saturation -30 clipped at 0; value +30 clipped at 255
        (5, -30, 30): [[4, 225, 255], [5, 225, 255], [125, 225, 255], [5, 0, 130], [5, 0, 255], [5, 0, 30]],
        (0, 0, 0): hsv,
    }
    for gains, out_hsv in expected.items():
        want = cv2.cvtColor(np.array([out_hsv], np.uint8), cv2.COLOR_HSV2BGR)
        np.testing.assert_array_equal(hsv_jitter(bgr, gains), want)
    with pytest.raises(ValueError, match='uint8'):
        hsv_jitter(bgr.astype(np.float32), (0, 0, 0))


def test_gains_are_drawn_truncated_toward_zero_and_kept_by_coin():
    # uniform x (5, 30, 30): -4.95 -> -4, 15.0 -> 15, -0.9 -> 0 (truncation, not floor)
    flip, gains = draw_frame_augment(scripted(True, [-0.99, 0.5, -0.03], [1, 1, 1], True), 0.5, 1.0)
    assert flip is True and gains.dtype == np.int16 and gains.tolist() == [-4, 15, 0]
    _, gains = draw_frame_augment(scripted(True, [-0.5, -0.999, 0.999], [1, 1, 1], False), 0.5, 1.0)
    assert gains.tolist() == [-2, -29, 29]
    flip, gains = draw_frame_augment(scripted(True, [0.9, 0.9, 0.9], [0, 1, 0], False), 0.5, 1.0)
    assert flip is False and gains.tolist() == [0, 27, 0]
    flip, gains = draw_frame_augment(scripted(False, [0.9, 0.9, 0.9], [1, 1, 1], True), 0.5, 0.5)
    assert flip is True and gains is None
    assert draw_frame_augment(scripted(True, [0.9, 0.9, 0.9], [1, 1, 1], True), 0.0, 0.0) == (False, None)
    # a real generator: the same seed, the same draws; gains within the official ranges
    draws = [draw_frame_augment(random.Random(3), 0.5, 1.0) for _ in range(2)]
    assert draws[0][0] == draws[1][0] and np.array_equal(draws[0][1], draws[1][1])
    many = np.array([draw_frame_augment(random.Random(s), 0.5, 1.0)[1] for s in range(200)])
    assert (np.abs(many) <= np.array(HSV_GAINS) - 1).all() and (many == 0).any(0).all() and (many != 0).any(0).all()


def official():
    return np.load(FIXTURE)


@pytest.mark.parametrize('seed', [7, 24, 1, 15, 9])
def test_hsv_jitter_equals_the_official_augment_hsv(seed):
    d = official()
    gains = draw_frame_augment(scripted(True, d[f'palette_seed{seed}_uniform'], d[f'palette_seed{seed}_keep'], False),
                               0.5, 1.0)[1]
    np.testing.assert_array_equal(hsv_jitter(d['palette'], gains), d[f'palette_seed{seed}'])


def xml_boxes(path):
    objs = ET.parse(path).findall('object')
    return np.array([[float(o.find(f'bndbox/{k}').text) for k in ('xmin', 'ymin', 'xmax', 'ymax')] for o in objs],
                    np.float32)


@pytest.mark.parametrize('case', range(4))
def test_letterbox_jitter_and_flip_equal_the_official_train_transform(case):
    """viddet's letterbox + augment_frames with the official draws give the official TrainTransform's
    frame exactly (resize, then HSV, then flip, then pad) and its boxes."""
    d = official()
    frame = str(d['frames'][case])
    root = shared_path('data', 'mini_vid')
    image = cv2.imread(str(root / 'Data/VID/train' / frame))
    tensor, meta = YOLOV.train_transform(image, (int(d['size']), int(d['size'])))
    boxes = xml_boxes(root / 'Annotations/VID/train' / frame.replace('JPEG', 'xml'))
    flip = bool(d[f'case{case}_flip'])
    rng = scripted(True, d[f'case{case}_uniform'], d[f'case{case}_keep'], flip)
    frames = tensor[None].clone()
    augment_frames(frames, [meta], [placed_boxes(boxes, meta, False)], rng, 0.5, 1.0)
    assert meta.flip is flip
    np.testing.assert_array_equal(frames[0].permute(1, 2, 0).numpy().astype(np.uint8), d[f'case{case}_image'])
    targets = frame_targets(torch.from_numpy(placed_boxes(boxes, meta, meta.flip)), torch.zeros(len(boxes)))
    np.testing.assert_allclose(targets[:, 1:].numpy(), d[f'case{case}_labels'][:, 1:], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ per-frame flips
def test_each_frame_flips_on_its_own_with_its_boxes(tmp_path):
    ann = tiny_video(tmp_path)
    item = yolov_dataset(tmp_path, ann, seed=11)[2]
    flips = [m.flip for m in item['img_metas']]
    assert len(flips) == 16 and 0 < sum(flips) < 16                 # independent decisions, both kinds
    plain, frame_ids = plain_letterbox(tmp_path, item)
    unflipped = yolov_dataset(tmp_path, ann, seed=11, flip_ratio=0.0)[2]
    assert unflipped['ref_frame_ids'] == item['ref_frame_ids']       # flips draw after the references
    imgs, boxes = frames_of(item)
    for t, p, meta, b, b0, f in zip(imgs, plain, item['img_metas'], boxes, frames_of(unflipped)[1], frame_ids):
        h, w = meta.img_shape
        assert (h, w) == (120, 160) and t.shape == (3, 160, 160)
        if meta.flip:
            torch.testing.assert_close(t[:, :h, :w], p[:, :h, :w].flip(-1), rtol=0, atol=0)
            torch.testing.assert_close(b, torch.stack([w - b0[:, 2], b0[:, 1], w - b0[:, 0], b0[:, 3]], 1))
        else:
            torch.testing.assert_close(t, p, rtol=0, atol=0)
            torch.testing.assert_close(b, b0)
        assert (t[:, h:] == 114).all()                               # the padding stays grey
        if f != 5:  # frame f's box [f + 3, 4, 20, 12] x 2 (80 x 60 -> 160 x 120)
            torch.testing.assert_close(b0, torch.tensor([[2.0 * f + 6, 8, 2.0 * f + 46, 32]]))
    for t, p in zip(frames_of(unflipped)[0], plain):
        torch.testing.assert_close(t, p, rtol=0, atol=0)


def test_flips_are_reproducible_and_differ_between_seeds(tmp_path):
    ann = tiny_video(tmp_path)
    ds = yolov_dataset(tmp_path, ann, seed=0)
    patterns = []
    for seed in range(4):
        ds.rng = random.Random(seed)
        a = ds[2]
        ds.rng = random.Random(seed)
        b = ds[2]
        assert [m.flip for m in a['img_metas']] == [m.flip for m in b['img_metas']]
        torch.testing.assert_close(a['ref_imgs'], b['ref_imgs'], rtol=0, atol=0)
        patterns.append({f: m.flip for f, m in zip([a['frame_id']] + a['ref_frame_ids'], a['img_metas'])})
    assert len({tuple(sorted(p.items())) for p in patterns}) == 4


def test_a_frame_without_boxes_is_neither_flipped_nor_jittered(tmp_path):
    ann = tiny_video(tmp_path)
    item = yolov_dataset(tmp_path, ann, seed=1, flip_ratio=1.0, hsv_prob=1.0)[2]
    plain, frame_ids = plain_letterbox(tmp_path, item)
    assert 5 in frame_ids
    for t, p, meta, f in zip(frames_of(item)[0], plain, item['img_metas'], frame_ids):
        assert meta.flip is (f != 5)
        if f == 5:
            torch.testing.assert_close(t, p, rtol=0, atol=0)
        else:
            assert not torch.equal(t, p) and (t[:, 120:] == 114).all()


def test_hsv_jitter_through_the_dataset_changes_only_the_image_region(tmp_path):
    ann = tiny_video(tmp_path)
    item = yolov_dataset(tmp_path, ann, seed=4, flip_ratio=0.0, hsv_prob=1.0)[2]
    plain, frame_ids = plain_letterbox(tmp_path, item)
    changed = 0
    for t, p, f in zip(frames_of(item)[0], plain, frame_ids):
        assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 255
        assert (t[:, 120:] == 114).all()
        changed += not torch.equal(t, p)
    assert changed >= 8        # a frame keeps its pixels only when all three coins drop its gains


# ------------------------------------------------------------------------------------ Faster R-CNN unchanged
def test_faster_rcnn_items_keep_one_shared_flip_and_their_draws(tmp_path):
    """The shared flip decision, reference frames and boxes recorded before the per-frame augmentation
    existed, for seeds 0..5 (item 3 = frame 3 of the tiny video, FGFA's sampler, 80 x 60 -> 160 x 120)."""
    ann = tiny_video(tmp_path)
    recorded = [([1, 10], True), ([0, 5], True), ([0, 5], True), ([0, 12], True), ([0, 8], True), ([2, 8], False)]
    for seed, (refs, flip) in enumerate(recorded):
        ds = VideoDataset(ann, tmp_path, ref_sampler=FGFA_SAMPLER, img_scale=(160, 120), flip_ratio=0.5,
                          rng=random.Random(seed))
        assert not ds.per_frame_augment and ds.hsv_prob == 0.0
        it = ds[3]
        assert it['ref_frame_ids'] == refs and [m.flip for m in it['img_metas']] == [flip] * 3
        images = [cv2.imread(str(tmp_path / f'v1/{f:06d}.png')) for f in [3] + refs]
        tensors, _ = prepare_sequence(images, (160, 120), flip)
        torch.testing.assert_close(torch.cat([it['img'][None], it['ref_imgs']]), tensors, rtol=0, atol=0)
        key = torch.tensor([[12.0, 8.0, 52.0, 32.0]])
        want = torch.stack([160 - key[:, 2], key[:, 1], 160 - key[:, 0], key[:, 3]], 1) if flip else key
        torch.testing.assert_close(it['gt_bboxes'], want)


def test_dataset_refuses_hsv_without_per_frame_augmentation(tmp_path):
    ann = tiny_video(tmp_path)
    with pytest.raises(ValueError, match='needs per_frame_augment'):
        VideoDataset(ann, tmp_path, ref_sampler=FGFA_SAMPLER, hsv_prob=0.5)
    with pytest.raises(ValueError, match='needs a transform'):
        VideoDataset(ann, tmp_path, ref_sampler=FGFA_SAMPLER, per_frame_augment=True)


# ------------------------------------------------------------------------------------ config
def test_the_family_augments_per_frame_and_the_faster_rcnn_methods_do_not():
    from viddet.methods import METHODS
    assert YOLOV.per_frame_augment and YOLOVPP.per_frame_augment
    assert {m.name for m in METHODS if m.per_frame_augment} == {'yolov', 'yolovpp'}


def test_shipped_configs_set_the_official_augmentation():
    for path in sorted(REPO.glob('configs/**/*.yaml')):
        c = load_config(path)
        family = c.model.method in ('yolov', 'yolovpp')
        assert (c.data.hsv_prob, c.data.flip_ratio) == ((1.0 if family else 0.0), 0.5), path


@pytest.mark.parametrize('overrides, message', [
    (['data.hsv_prob=1.5'], r'<t>: data.hsv_prob must be in \[0, 1\], got 1.5$'),
    (['data.hsv_prob=-0.1', 'model.method=yolov', 'model.backbone=yolox_s'], r'data.hsv_prob must be in \[0, 1\]'),
    (['data.hsv_prob=1'],
     r'<t>: data.hsv_prob=1.0 but method selsa has no HSV jitter \(only yolov, yolovpp\); set it to 0$'),
    (['data.hsv_prob=often', 'model.method=yolov', 'model.backbone=yolox_s'], r'data.hsv_prob'),
    (['data.flip_ratio=2', 'model.method=yolovpp', 'model.backbone=yolox_s'], r'data.flip_ratio must be in \[0, 1\]'),
])
def test_bad_augmentation_values_fail_with_one_clear_line(overrides, message):
    with pytest.raises(VidDetError, match=message) as e:
        config_from_dict({}, '<t>', overrides=overrides)
    assert '\n' not in str(e.value)


def test_the_trainer_builds_the_family_datasets_with_per_frame_augmentation(tmp_path):
    from train_utils import CLASSES, make_tiny_vid
    from viddet.engine.train_set import build_train_set
    data = make_tiny_vid(tmp_path, num_videos=1, num_frames=3)
    for method, backbone, hsv in [('yolov', 'yolox_s', 1.0), ('yolovpp', 'yolox_s', 0.25), ('fgfa', 'r50', 0.0)]:
        refs = {'num_ref_imgs': 2, 'frame_range': 2, 'filter_key_img': True, 'method': 'uniform'}
        raw = {'model': {'method': method, 'backbone': backbone, 'classes': CLASSES},
               'data': {'train': [dict(data, ref_sampler=refs)], 'scale': [64, 64], 'hsv_prob': hsv}}
        ds = build_train_set(config_from_dict(raw, '<t>'), say=lambda line: None).datasets[0]
        assert (ds.per_frame_augment, ds.hsv_prob) == (method != 'fgfa', hsv)
