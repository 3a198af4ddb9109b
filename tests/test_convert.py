"""ImageNet VID XML -> COCO-VID converter and the check-data validator."""
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from viddet import VID_CLASSES, VID_SYNSETS, VidDetError
from viddet.data.check import check_data
from viddet.data.ilsvrc import parse_ilsvrc_xml, parse_train_list
from viddet.data.imagenet_vid import convert_imagenet_vid, convert_vid_split


# ----------------------------------------------------------------------------- synthetic tree
def _xml(width, height, objects, video=True):
    objs = ''
    for o in objects:
        extra = (f"<trackid>{o['trackid']}</trackid><occluded>{o.get('occ', 0)}</occluded>"
                 f"<generated>{o.get('gen', 0)}</generated>") if video else ''
        objs += (f"<object>{extra}<name>{o['name']}</name><bndbox><xmax>{o['box'][2]}</xmax>"
                 f"<xmin>{o['box'][0]}</xmin><ymax>{o['box'][3]}</ymax><ymin>{o['box'][1]}</ymin></bndbox></object>")
    return f"<annotation><size><width>{width}</width><height>{height}</height></size>{objs}</annotation>"


def make_tree(tmp_path: Path, list_dir='ImageSets'):
    """Two train videos (3 and 2 frames) and one val video (3 frames) with known boxes."""
    root = tmp_path / 'ILSVRC'
    car, dog = VID_SYNSETS[VID_CLASSES.index('car')], VID_SYNSETS[VID_CLASSES.index('dog')]
    videos = {
        'train/a/v0': [[dict(trackid=0, name=car, box=(10, 20, 50, 60))],
                       [dict(trackid=0, name=car, box=(12, 20, 52, 60)), dict(trackid=3, name=dog, box=(0, 0, 5, 9), occ=1)],
                       []],
        'train/a/v1': [[dict(trackid=1, name=dog, box=(1, 2, 3, 4), gen=1)],
                       [dict(trackid=1, name='n00000000', box=(1, 2, 3, 4))]],
        'val/w0': [[dict(trackid=0, name=car, box=(0, 0, 99, 49))]] * 3,
    }
    for vname, frames in videos.items():
        for f, objs in enumerate(frames):
            x = root / 'Annotations' / 'VID' / vname / f'{f:06d}.xml'
            x.parent.mkdir(parents=True, exist_ok=True)
            x.write_text(_xml(100, 50, objs))
            j = root / 'Data' / 'VID' / vname / f'{f:06d}.JPEG'
            j.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(j), np.zeros((50, 100, 3), np.uint8))
    lists = root / list_dir
    lists.mkdir(parents=True)
    (lists / 'VID_train_15frames.txt').write_text(
        'train/a/v0 1 0 3\ntrain/a/v0 1 2 3\ntrain/a/v1 1 1 2\n')
    (lists / 'VID_val_videos.txt').write_text('val/w0 1 0 3\n')
    return root


# ----------------------------------------------------------------------------- synthetic checks
def test_schema_and_values_synthetic(tmp_path):
    root = make_tree(tmp_path)
    out = tmp_path / 'ann'
    summ = convert_imagenet_vid(root, out, progress=False, verbose=False)
    assert set(summ) == {'train', 'val', 'det'}
    assert not (out / 'imagenet_det_30plus1cls.json').exists()  # no DET folder: skipped, no error
    assert 'DET' in summ['det'].warnings[0]
    d = json.loads((out / 'imagenet_vid_train.json').read_text())
    assert list(d) == ['categories', 'videos', 'images', 'annotations']
    assert d['categories'][6] == dict(id=7, name='car', encode_name='n02958343')
    assert d['videos'] == [dict(id=1, name='train/a/v0', vid_train_frames=[0, 2]),
                           dict(id=2, name='train/a/v1', vid_train_frames=[1])]
    assert [im['id'] for im in d['images']] == [1, 2, 3, 4, 5]
    assert d['images'][0] == dict(file_name='train/a/v0/000000.JPEG', height=50, width=100, id=1,
                                  frame_id=0, video_id=1, is_vid_train_frame=True)
    assert [im['is_vid_train_frame'] for im in d['images']] == [True, False, True, False, True]
    assert list(d['annotations'][0]) == ['id', 'video_id', 'image_id', 'category_id', 'instance_id', 'bbox',
                                         'area', 'iscrowd', 'occluded', 'generated']
    a = d['annotations']
    # XML order; bbox = [xmin, ymin, xmax-xmin, ymax-ymin] without +1; instance ids per (video, trackid)
    assert [(x['image_id'], x['category_id'], x['instance_id'], x['bbox'], x['area']) for x in a] == [
        (1, 7, 1, [10, 20, 40, 40], 1600), (2, 7, 1, [12, 20, 40, 40], 1600), (2, 9, 2, [0, 0, 5, 9], 45),
        (4, 9, 3, [1, 2, 2, 2], 4)]  # the unknown synset of v1 frame 1 is dropped
    assert a[2]['occluded'] is True and a[2]['generated'] is False and a[3]['generated'] is True
    assert summ['train'].num_no_objects == 1 and summ['train'].num_unknown_synsets == 1
    v = json.loads((out / 'imagenet_vid_val.json').read_text())
    assert v['videos'] == [dict(id=1, name='val/w0', vid_train_frames=[])]
    assert not any(im['is_vid_train_frame'] for im in v['images'])
    assert not list(out.glob('.*tmp'))  # atomic write left no temporary file


def test_mmtracking_compat_off_by_one(tmp_path):
    root = make_tree(tmp_path, list_dir='Lists')  # MMTracking's folder name works too
    d, s = convert_vid_split(root, 'train', mmtracking_compat=True, progress=False)
    # list frames 0, 2 / 1 become -1, 1 / 0: frame 0 of v0 is lost, frame 1 of v0 and frame 0 of v1 marked
    assert d['videos'][0]['vid_train_frames'] == [-1, 1] and d['videos'][1]['vid_train_frames'] == [0]
    assert [im['is_vid_train_frame'] for im in d['images']] == [False, True, False, True, False]
    assert s.num_train_frames == 2
    d2, s2 = convert_vid_split(root, 'train', mmtracking_compat=False, progress=False)
    assert s2.num_train_frames == 3


def test_bad_xml_raises_or_is_collected(tmp_path):
    root = make_tree(tmp_path)
    bad = root / 'Annotations/VID/train/a/v0/000001.xml'
    bad.write_text('<annotation><size><width>100</width>')  # truncated
    with pytest.raises(VidDetError, match=r'v0/000001\.xml: malformed XML'):
        convert_vid_split(root, 'train', progress=False)
    missing = root / 'Annotations/VID/train/a/v1/000000.xml'
    missing.unlink()
    d, s = convert_vid_split(root, 'train', skip_bad=True, progress=False)
    assert [Path(p).name for p, _ in s.bad_files] == ['000001.xml', '000000.xml']
    assert 'malformed XML' in s.bad_files[0][1] and 'not found' in s.bad_files[1][1]
    assert '2 bad annotation files' in s.format() and '000001.xml' in s.format()
    # the frames stay (ids remain consecutive), without objects, with the size of the JPEG
    assert [im['id'] for im in d['images']] == [1, 2, 3, 4, 5]
    assert d['images'][1]['width'] == 100 and d['images'][1]['height'] == 50
    assert {a['image_id'] for a in d['annotations']} == {1}


@pytest.mark.parametrize('body,msg', [
    ('<annotation><object><name>n02958343</name></object></annotation>', 'missing <size>'),
    ('<annotation><size><width>10</width><height>1x</height></size></annotation>', r"<height> '1x' is not an integer"),
    ('<annotation><size><width>10</width><height>10</height></size><object><trackid>0</trackid>'
     '<name>n02958343</name></object></annotation>', r'object 0 \(n02958343\) has no <bndbox>'),
    ('<annotation><size><width>10</width><height>10</height></size><object><trackid>0</trackid>'
     '<name>n02958343</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax></bndbox></object></annotation>',
     'missing <ymax>'),
    ('<annotation><size><width>10</width><height>10</height></size><object>'
     '<name>n02958343</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></object>'
     '</annotation>', 'has no <trackid>'),
])
def test_xml_problems_name_file(tmp_path, body, msg):
    p = tmp_path / 'x.xml'
    p.write_text(body)
    with pytest.raises(VidDetError, match=msg) as e:
        parse_ilsvrc_xml(p)
    assert str(p) in str(e.value)


def test_bad_list_lines(tmp_path):
    p = tmp_path / 'VID_train_15frames.txt'
    p.write_text('train/v 1 0 3\ntrain/v 1 3 3\n')
    with pytest.raises(VidDetError, match=r'VID_train_15frames\.txt:2: frame 3 is outside 0\.\.2'):
        parse_train_list(p)
    assert parse_train_list(p, mmtracking_compat=True)['train/v']['vid_train_frames'] == [-1, 2]
    p.write_text('train/v 1 zero 3\n')
    with pytest.raises(VidDetError, match=r":1: frame number 'zero' is not an integer"):
        parse_train_list(p)
    with pytest.raises(VidDetError, match=r'Annotations/VID/val: folder not found'):
        convert_imagenet_vid(tmp_path, tmp_path / 'o', splits=['val'], progress=False, verbose=False)
    (tmp_path / 'Annotations/VID/val').mkdir(parents=True)
    with pytest.raises(VidDetError, match='neither .*Lists nor .*ImageSets exists'):
        convert_imagenet_vid(tmp_path, tmp_path / 'o', splits=['val'], progress=False, verbose=False)


def test_det_conversion(tmp_path):
    root = make_tree(tmp_path)
    car = VID_SYNSETS[VID_CLASSES.index('car')]
    det = root / 'Annotations' / 'DET' / 'train'
    files = {'ILSVRC2014_train_0000/ILSVRC2014_train_00000002': [dict(name=car, box=(1, 1, 11, 21))],
             'ILSVRC2014_train_0000/ILSVRC2014_train_00000001': [dict(name='n99999999', box=(0, 0, 4, 4))],
             'ILSVRC2013_train/n01/n01_7': []}
    for stem, objs in files.items():
        (det / f'{stem}.xml').parent.mkdir(parents=True, exist_ok=True)
        (det / f'{stem}.xml').write_text(_xml(64, 48, objs, video=False))
    (root / 'ImageSets' / 'DET_train_30classes.txt').write_text(
        'train/ILSVRC2014_train_0000/ILSVRC2014_train_00000002 1\n')
    s = convert_imagenet_vid(root, tmp_path / 'ann', splits=['det'], progress=False, verbose=False)['det']
    d = json.loads((tmp_path / 'ann' / 'imagenet_det_30plus1cls.json').read_text())
    assert list(d) == ['categories', 'images', 'annotations']
    assert d['categories'][-1] == dict(id=31, name='other_categeries', encode_name=None)
    # listed image first (True), then the ILSVRC2013 subset, then ILSVRC2014_train_0000 (False)
    assert [(im['file_name'], im['is_vid_train_frame']) for im in d['images']] == [
        ('train/ILSVRC2014_train_0000/ILSVRC2014_train_00000002.JPEG', True),
        ('train/ILSVRC2013_train/n01/n01_7.JPEG', False),
        ('train/ILSVRC2014_train_0000/ILSVRC2014_train_00000001.JPEG', False)]
    assert d['annotations'] == [dict(id=1, image_id=1, category_id=7, bbox=[1, 1, 10, 20], area=200, iscrowd=False),
                                dict(id=2, image_id=3, category_id=31, bbox=[0, 0, 4, 4], area=16, iscrowd=False)]
    assert s.num_train_frames == 1 and s.num_no_objects == 1
    # a broken XML stops the conversion, or with skip_bad keeps its image without objects and lists it
    bad = det / 'ILSVRC2014_train_0000/ILSVRC2014_train_00000001.xml'
    bad.write_text('<annotation><size>')
    with pytest.raises(VidDetError, match=r'ILSVRC2014_train_00000001\.xml: malformed XML'):
        convert_imagenet_vid(root, tmp_path / 'ann', splits=['det'], progress=False, verbose=False)
    s = convert_imagenet_vid(root, tmp_path / 'ann', splits=['det'], skip_bad=True, progress=False, verbose=False)['det']
    d = json.loads((tmp_path / 'ann' / 'imagenet_det_30plus1cls.json').read_text())
    assert [b[0] for b in s.bad_files] == [str(bad)] and s.num_images == 3
    assert (d['images'][2]['width'], d['images'][2]['height']) == (0, 0) and len(d['annotations']) == 1


# ----------------------------------------------------------------------------- real mini_vid
def _xml_objects(path):
    root = ET.parse(path).getroot()
    size = (int(root.find('size/width').text), int(root.find('size/height').text))
    objs = []
    for o in root.findall('object'):
        b = o.find('bndbox')
        objs.append((o.find('name').text, o.find('trackid').text,
                     [int(b.find(k).text) for k in ('xmin', 'ymin', 'xmax', 'ymax')],
                     o.find('occluded').text == '1', o.find('generated').text == '1'))
    return size, objs


def test_mini_vid_against_xml(shared, tmp_path):
    root = shared('data', 'mini_vid')
    summ = convert_imagenet_vid(root, tmp_path, progress=False, verbose=False)
    tr = json.loads((tmp_path / 'imagenet_vid_train.json').read_text())
    va = json.loads((tmp_path / 'imagenet_vid_val.json').read_text())
    assert (len(tr['videos']), len(tr['images']), len(tr['annotations'])) == (12, 480, 480)
    assert (len(va['videos']), len(va['images']), len(va['annotations'])) == (4, 259, 259)
    assert summ['train'].num_train_frames == 180  # 12 x 15 listed frames
    # val image id == global frame id of VID_val_videos.txt (start + frame)
    starts = {l.split()[0]: int(l.split()[1]) for l in (root / 'ImageSets/VID_val_videos.txt').read_text().split('\n') if l}
    vname = {v['id']: v['name'] for v in va['videos']}
    assert all(im['id'] == starts[vname[im['video_id']]] + im['frame_id'] for im in va['images'])
    # training frames == the listed 0-based frames
    listed = {}
    for l in (root / 'ImageSets/VID_train_15frames.txt').read_text().split('\n'):
        if l:
            listed.setdefault(l.split()[0], set()).add(int(l.split()[2]))
    tname = {v['id']: v['name'] for v in tr['videos']}
    assert {(tname[im['video_id']], im['frame_id']) for im in tr['images'] if im['is_vid_train_frame']} == \
        {(v, f) for v, fs in listed.items() for f in fs}
    for data, split in ((tr, 'train'), (va, 'val')):
        by_img = {}
        for a in data['annotations']:
            by_img.setdefault(a['image_id'], []).append(a)
        for im in data['images'][::37]:  # a few frames of every video
            (w, h), objs = _xml_objects(root / 'Annotations/VID' / im['file_name'].replace('.JPEG', '.xml'))
            assert (im['width'], im['height']) == (w, h)
            assert (root / 'Data/VID' / im['file_name']).is_file()
            anns = by_img.get(im['id'], [])
            assert len(anns) == len(objs)
            for a, (syn, tid, (x1, y1, x2, y2), occ, gen) in zip(anns, objs):
                assert VID_SYNSETS[a['category_id'] - 1] == syn
                assert a['bbox'] == [x1, y1, x2 - x1, y2 - y1] and a['area'] == (x2 - x1) * (y2 - y1)
                assert (a['occluded'], a['generated'], a['iscrowd']) == (occ, gen, False)
                assert a['video_id'] == im['video_id']
    # compat mode: every listed frame shifted one earlier, listed zeros lost
    compat = convert_imagenet_vid(root, tmp_path / 'c', mmtracking_compat=True, splits=['train'],
                                  progress=False, verbose=False)
    n_zero = sum(1 for fs in listed.values() if 0 in fs)
    assert compat['train'].num_train_frames == 180 - n_zero
    report = check_data(tmp_path / 'imagenet_vid_val.json', root)
    assert report.ok, report.format()


# sha256 of the files MMTracking's own tools/convert_datasets/ilsvrc/imagenet2coco_vid.py (v0.14.0) writes
# for mini_vid (run once with a two-function mmcv stub for list_from_file/dump; Lists/ = ImageSets/)
MMTRACKING_MINI_VID_SHA256 = {
    'imagenet_vid_train.json': 'f32317489c17a916314f46d1a42489d93aa30d31d272ccbe9d5d06a01ca80022',
    'imagenet_vid_val.json': '1b26fe38907609412a4059d1fbfdccd3722a87010f01f4b94cb090bdd529b71d',
}


def test_mini_vid_byte_identical_to_mmtracking(shared, tmp_path):
    import hashlib
    root = shared('data', 'mini_vid')
    convert_imagenet_vid(root, tmp_path / 'compat', mmtracking_compat=True, splits=['train', 'val'],
                         progress=False, verbose=False)
    convert_imagenet_vid(root, tmp_path / 'fixed', splits=['train', 'val'], progress=False, verbose=False)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for name, h in MMTRACKING_MINI_VID_SHA256.items():
        assert digest(tmp_path / 'compat' / name) == h, name
    # the fix changes only the training frames: val stays identical, train differs
    assert digest(tmp_path / 'fixed' / 'imagenet_vid_val.json') == MMTRACKING_MINI_VID_SHA256['imagenet_vid_val.json']
    assert digest(tmp_path / 'fixed' / 'imagenet_vid_train.json') != MMTRACKING_MINI_VID_SHA256['imagenet_vid_train.json']


# ----------------------------------------------------------------------------- check_data
def _write(tmp_path, obj, name='a.json'):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_check_data_finds_problems(tmp_path):
    root = make_tree(tmp_path)
    d, _ = convert_vid_split(root, 'train', progress=False)
    p = _write(tmp_path, d, 'good.json')
    good = check_data(p, root)
    assert good.ok, good.format()
    assert good.image_root.endswith('Data/VID')
    d['annotations'][0]['bbox'] = [10, 20, 0, 5]           # zero width
    d['annotations'][1]['bbox'] = [200, 20, 5, 5]          # outside the 100x50 image
    d['annotations'][2]['bbox'] = [95, 0, 10, 5]           # partly outside: warning only
    d['annotations'][3]['category_id'] = 99                # unknown category
    d['annotations'].append(dict(d['annotations'][0], id=d['annotations'][0]['id'], bbox=[1, 1, 2, 2]))
    d['images'][4]['file_name'] = 'train/a/v1/000009.JPEG'  # missing frame file
    r = check_data(_write(tmp_path, d), root)
    assert not r.ok
    assert r.error_counts == {'bad box': 2, 'unknown category': 1, 'duplicate id': 1, 'missing frame': 1}
    assert r.warning_counts == {'box outside image': 1}
    text = r.format()
    assert 'annotation id 1 (image 1, train/a/v0/000000.JPEG): bbox [10, 20, 0, 5] has non-positive' in text
    assert 'lies outside the 100x50 image' in text and 'category_id 99' in text
    assert 'annotations id 1 appears at index 0 and 4' in text and '000009.JPEG not found' in text
    d['images'][1]['frame_id'] = 5
    r = check_data(_write(tmp_path, d), None)
    assert 'bad frame_id' in r.error_counts and 'missing frame' not in r.error_counts


def test_check_data_malformed_json(tmp_path):
    p = tmp_path / 'broken.json'
    p.write_text('{"images": [1, 2,')
    with pytest.raises(VidDetError, match=r'broken\.json: not valid JSON .* line 1'):
        check_data(p)
    with pytest.raises(VidDetError, match='nothere.json: annotation file not found'):
        check_data(tmp_path / 'nothere.json')
    r = check_data(_write(tmp_path, {'images': []}))
    assert not r.ok and 'missing or non-list "annotations"' in r.format()
