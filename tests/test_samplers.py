"""Reference-frame samplers (MMTracking ref_img_sampling), annotation parsing, filters, train transforms."""
import random

import cv2
import numpy as np
import pytest
import torch

from viddet import VidDetError
from viddet.data.sequence import flip_boxes, resize_boxes
from viddet.data.video_dataset import VideoDataset, parse_ann_info, sample_ref_frames

# MMTracking's train samplers (configs/_base_/datasets/imagenet_vid_{dff,fgfa}_style.py)
DFF_TRAIN_SAMPLER = dict(num_ref_imgs=1, frame_range=9, filter_key_img=False, method='uniform')
FGFA_TRAIN_SAMPLER = dict(num_ref_imgs=2, frame_range=9, filter_key_img=True, method='bilateral_uniform')
DET_TRAIN_SAMPLER_FGFA = dict(num_ref_imgs=2, frame_range=0, filter_key_img=False, method='bilateral_uniform')


# ------------------------------------------------------------------------------------ train samplers
def test_uniform_window_and_key_filter():
    rng = random.Random(0)
    for f, L in [(0, 1), (0, 40), (5, 40), (39, 40), (20, 40)]:
        for _ in range(50):
            s = sample_ref_frames(f, L, frame_range=9, num_ref_imgs=3, filter_key_img=True, method='uniform', rng=rng)
            cands = [x for x in range(max(0, f - 9), min(f + 9, L - 1) + 1) if x != f]
            assert len(s.frame_ids) == min(3, len(cands)) and len(set(s.frame_ids)) == len(s.frame_ids)
            assert set(s.frame_ids) <= set(cands) and s.frame_ids == sorted(s.frame_ids)
    # DFF (filter_key_img False): the key can be its own reference; a 1-frame video always gives it
    assert sample_ref_frames(0, 1, rng=rng, **DFF_TRAIN_SAMPLER).frame_ids == [0]
    seen = {sample_ref_frames(3, 10, rng=rng, **DFF_TRAIN_SAMPLER).frame_ids[0] for _ in range(400)}
    assert seen == set(range(0, 10))  # [max(0, 3-9), min(3+9, 9)] with the key
    # same draws as MMTracking's random.sample over the candidate list for the same seed
    a = sample_ref_frames(20, 40, frame_range=9, num_ref_imgs=2, method='uniform', rng=random.Random(7))
    cands = [x for x in range(11, 30) if x != 20]
    assert a.frame_ids == sorted(random.Random(7).sample(cands, 2))


def test_bilateral_uniform():
    rng = random.Random(1)
    for _ in range(100):
        s = sample_ref_frames(20, 40, rng=rng, **FGFA_TRAIN_SAMPLER)
        left, right = s.frame_ids
        assert 11 <= left < 20 < right <= 29
    # at the ends one side is empty: a single reference
    s = sample_ref_frames(0, 40, rng=rng, **FGFA_TRAIN_SAMPLER)
    assert len(s.frame_ids) == 1 and 1 <= s.frame_ids[0] <= 9
    s = sample_ref_frames(39, 40, rng=rng, **FGFA_TRAIN_SAMPLER)
    assert len(s.frame_ids) == 1 and 30 <= s.frame_ids[0] <= 38
    assert sample_ref_frames(0, 1, rng=rng, **FGFA_TRAIN_SAMPLER).frame_ids == []
    with pytest.raises(VidDetError, match='even num_ref_imgs'):
        sample_ref_frames(5, 40, frame_range=9, num_ref_imgs=3, method='bilateral_uniform')


def test_non_video_and_bad_configs():
    # DET images / frame_range 0: copies of the key
    assert sample_ref_frames(-1, 1, is_video=False, **DET_TRAIN_SAMPLER_FGFA).frame_ids == [-1, -1]
    assert sample_ref_frames(7, 40, frame_range=0, num_ref_imgs=2, method='uniform').frame_ids == [7, 7]
    with pytest.raises(VidDetError, match='unknown reference sampling method'):
        sample_ref_frames(0, 5, method='random')
    with pytest.raises(VidDetError, match='must satisfy lo <= 0 <= hi'):
        sample_ref_frames(0, 5, frame_range=[1, 3])
    with pytest.raises(VidDetError, match='can not be negative'):
        sample_ref_frames(0, 5, frame_range=-1)
    # the test-time protocols are the methods' own (selsa.adaptive_stride_refs, FGFA.window), not samplers
    with pytest.raises(VidDetError, match='unknown reference sampling method'):
        sample_ref_frames(0, 5, method='test_with_adaptive_stride')


# ------------------------------------------------------------------------------------ parsing / filters
def test_parse_ann_info_rules():
    img = dict(width=100, height=50)
    anns = [dict(bbox=[10, 10, 20, 20], area=400, category_id=1, instance_id=5),
            dict(bbox=[10, 10, 20, 20], area=400, category_id=1, ignore=True),
            dict(bbox=[100, 10, 20, 20], area=400, category_id=1),            # no overlap with the image
            dict(bbox=[10, 10, 0.5, 20], area=10, category_id=1),            # w < 1
            dict(bbox=[10, 10, 20, 20], area=0, category_id=1),               # area 0
            dict(bbox=[10, 10, 20, 20], area=400, category_id=31),           # unknown class
            dict(bbox=[0, 0, 5, 5], area=25, category_id=2, iscrowd=True),   # crowd -> ignore boxes
            dict(bbox=[-5, 40, 20, 20], area=400, category_id=2, instance_id=6)]  # partly outside: kept
    out = parse_ann_info(img, anns, {1: 0, 2: 1})
    np.testing.assert_array_equal(out['bboxes'], np.array([[10, 10, 30, 30], [-5, 40, 15, 60]], np.float32))
    np.testing.assert_array_equal(out['labels'], [0, 1])
    np.testing.assert_array_equal(out['bboxes_ignore'], [[0, 0, 5, 5]])
    np.testing.assert_array_equal(out['instance_ids'], [5, 6])
    assert out['bboxes'].dtype == np.float32
    np.testing.assert_array_equal(parse_ann_info(img, anns, {1: 0, 2: 1}, with_instance_ids=False)['instance_ids'], [0, 1])
    empty = parse_ann_info(img, [], {1: 0})
    assert empty['bboxes'].shape == (0, 4) and empty['labels'].shape == (0,)


def test_box_resize_clip_flip():
    b = np.array([[10, 20, 110, 220], [0, 0, 400, 300]], np.float32)
    sf = np.array([0.5, 0.25, 0.5, 0.25], np.float32)
    r = resize_boxes(b, sf, (60, 150))  # (H, W)
    np.testing.assert_allclose(r, [[5, 5, 55, 55], [0, 0, 150, 60]])
    np.testing.assert_allclose(flip_boxes(r, 150), [[95, 5, 145, 55], [0, 0, 150, 60]])


def _tiny_vid(tmp_path, n_frames=12, width=64, height=48):
    """One video with a moving box, a second whose frames are too small, and frame files on disk."""
    ann = dict(categories=[dict(id=1, name='airplane'), dict(id=2, name='antelope')], videos=[], images=[], annotations=[])
    img_id = 1
    for vid, (w, h, n) in enumerate([(width, height, n_frames), (30, 20, 3)], 1):
        ann['videos'].append(dict(id=vid, name=f'v{vid}'))
        for f in range(n):
            ann['images'].append(dict(file_name=f'v{vid}/{f:06d}.JPEG', height=h, width=w, id=img_id, frame_id=f,
                                      video_id=vid, is_vid_train_frame=f % 2 == 0))
            img = np.full((h, w, 3), 10 * f, np.uint8)
            img[:, : w // 2, 2] = 255  # red left half: shows flips
            (tmp_path / f'v{vid}').mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / f'v{vid}/{f:06d}.JPEG'), img)
            if f != 4:  # frame 4 has no objects
                ann['annotations'].append(dict(id=len(ann['annotations']) + 1, image_id=img_id, video_id=vid, category_id=1,
                                               instance_id=vid, bbox=[f, 2, 10, 8], area=80, iscrowd=False))
            img_id += 1
    return ann


def test_dataset_train_filters_and_items(tmp_path):
    ann = _tiny_vid(tmp_path)
    ds = VideoDataset(ann, tmp_path, ref_sampler=FGFA_TRAIN_SAMPLER, img_scale=(128, 96), flip_ratio=0.0,
                      rng=random.Random(0))
    # training frames 0, 2, 4 (no objects: dropped), 6, 8, 10 of video 1; video 2 is under 32 px
    assert [i['frame_id'] for i in ds.data_infos] == [0, 2, 6, 8, 10]
    it = ds[1]  # frame 2
    assert it['img'].shape == (3, 96, 128) and it['ref_imgs'].shape == (2, 3, 96, 128)
    assert len(it['img_metas']) == 3 and it['img_metas'][0].img_shape == (96, 128)
    assert it['is_video_data'] is True and it['frame_id'] == 2
    left, right = it['ref_frame_ids']
    assert 0 <= left < 2 < right <= 11
    # box [2, 2, 12, 10] scaled by 2
    torch.testing.assert_close(it['gt_bboxes'], torch.tensor([[4.0, 4.0, 24.0, 20.0]]))
    assert it['gt_labels'].tolist() == [0] and it['gt_instance_ids'].tolist() == [1]


def test_dataset_shared_flip(tmp_path):
    ann = _tiny_vid(tmp_path)
    ds = VideoDataset(ann, tmp_path, ref_sampler=DFF_TRAIN_SAMPLER, img_scale=(128, 96), flip_ratio=1.0)
    it = ds[0]
    assert all(m.flip for m in it['img_metas'])
    # the red half moved to the right in key and reference (RGB channel 0 after normalisation)
    for t in [it['img'], it['ref_imgs'][0]]:
        assert t[0, :, 100:].mean() > t[0, :, :28].mean()
    torch.testing.assert_close(it['gt_bboxes'], torch.tensor([[128 - 20.0, 4.0, 128.0, 20.0]]))


def test_det_as_one_frame_videos(tmp_path):
    ann = _tiny_vid(tmp_path)
    det = dict(categories=ann['categories'] + [dict(id=31, name='other_categeries')],
               images=[dict(file_name='v1/000000.JPEG', height=48, width=64, id=1, is_vid_train_frame=True),
                       dict(file_name='v1/000001.JPEG', height=48, width=64, id=2, is_vid_train_frame=False)],
               annotations=[dict(id=1, image_id=1, category_id=2, bbox=[1, 1, 20, 20], area=400, iscrowd=False),
                            dict(id=2, image_id=1, category_id=31, bbox=[1, 1, 20, 20], area=400, iscrowd=False)])
    d = VideoDataset(det, tmp_path, load_as_video=False, ref_sampler=DET_TRAIN_SAMPLER_FGFA, img_scale=(128, 96),
                     flip_ratio=0)
    assert len(d) == 1
    it = d[0]
    assert it['is_video_data'] is False and it['ref_imgs'].shape[0] == 2
    torch.testing.assert_close(it['ref_imgs'][0], it['img'])  # references are copies of the key
    assert it['gt_labels'].tolist() == [1] and it['gt_instance_ids'].tolist() == [0]  # class 31 not a label


def test_dataset_bad_inputs(tmp_path):
    ann = _tiny_vid(tmp_path)
    (tmp_path / 'v1/000002.JPEG').unlink()
    ds = VideoDataset(ann, tmp_path, ref_sampler=None, img_scale=(128, 96))
    with pytest.raises(VidDetError, match=r'v1/000002\.JPEG: frame missing'):
        ds[1]
    ann['images'][3]['frame_id'] = 7
    with pytest.raises(VidDetError, match='frame_ids must be exactly 0..11'):
        VideoDataset(ann, tmp_path)
    p = tmp_path / 'bad.json'
    p.write_text('{"images": [')
    with pytest.raises(VidDetError, match=r'bad\.json: not valid JSON'):
        VideoDataset(p, tmp_path)


def test_mini_vid_dataset(shared, tmp_path):
    root = shared('data', 'mini_vid')
    from viddet.data.imagenet_vid import convert_imagenet_vid
    convert_imagenet_vid(root, tmp_path, splits=['train', 'val'], progress=False, verbose=False)
    ds = VideoDataset(tmp_path / 'imagenet_vid_train.json', root / 'Data/VID', ref_sampler=FGFA_TRAIN_SAMPLER,
                      rng=random.Random(0))
    assert len(ds) == 180
    it = ds[0]
    assert it['img'].shape == (3, 576, 1008)  # 854x480 -> 1000x562 (s = 600/480 capped by 1000/854), padded
    assert it['img_metas'][0].img_shape == (562, 1000)
    assert it['gt_bboxes'].shape == (1, 4) and (it['gt_bboxes'][:, 2:] > it['gt_bboxes'][:, :2]).all()
