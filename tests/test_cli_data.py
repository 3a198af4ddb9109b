"""viddet convert / check-data / eval end to end through the CLI entry point."""
import json

import pytest

from viddet.cli import main


def test_convert_check_eval_end_to_end(shared, tmp_path, capsys):
    root = shared('data', 'mini_vid')
    out = tmp_path / 'ann'
    assert main(['convert', 'imagenet-vid', '--root', str(root), '--out', str(out), '--no-progress']) == 0
    assert (out / 'imagenet_vid_train.json').is_file() and (out / 'imagenet_vid_val.json').is_file()
    assert main(['check-data', str(out / 'imagenet_vid_val.json'), '--root', str(root)]) == 0
    assert 'OK' in capsys.readouterr().out
    val = json.loads((out / 'imagenet_vid_val.json').read_text())
    res = [dict(image_id=a['image_id'], category_id=a['category_id'], bbox=a['bbox'], score=1.0) for a in val['annotations']]
    # plus a false positive ranked last: every metric stays 1.0 (recall 1 is reached at precision 1)
    res.append(dict(image_id=1, category_id=1, bbox=[0, 0, 50, 50], score=0.01))
    rp = tmp_path / 'res.json'
    rp.write_text(json.dumps(res))
    mj = tmp_path / 'm.json'
    assert main(['eval', str(rp), '--ann', str(out / 'imagenet_vid_val.json'), '--json', str(mj),
                 '--out-dir', str(tmp_path / 'ev')]) == 0
    text = capsys.readouterr().out
    assert 'COCO box AP@50' in text and 'ImageNet VID mAP@0.5' in text and 'slow' in text and 'fast' in text
    assert 'motion IoU: computed from ground truth' in text
    m = json.loads(mj.read_text())
    assert m['coco_ap50'] == pytest.approx(1.0) and m['vid_map'] == pytest.approx(1.0)
    assert m['per_class']['car']['num_objects'] == 80 and m['per_class']['airplane']['vid_ap'] is None
    # the devkit txt written by eval is accepted as input too
    assert main(['eval', str(tmp_path / 'ev' / 'detections_vid.txt'), '--ann', str(out / 'imagenet_vid_val.json'),
                 '--no-coco']) == 0


def test_cli_errors_and_exit_codes(tmp_path, capsys):
    ann = dict(categories=[dict(id=1, name='car')], images=[dict(id=1, file_name='x.jpg', width=10, height=10)],
               annotations=[dict(id=1, image_id=1, category_id=1, bbox=[2, 2, -3, 4], area=0)])
    p = tmp_path / 'a.json'
    p.write_text(json.dumps(ann))
    assert main(['check-data', str(p)]) == 1
    assert 'non-positive width or height' in capsys.readouterr().out
    bad = tmp_path / 'r.json'
    bad.write_text('[{"image_id": 1}')
    assert main(['eval', str(bad), '--ann', str(p)]) == 2
    err = capsys.readouterr().err
    assert 'viddet eval: error:' in err and 'r.json: not valid JSON' in err and 'Traceback' not in err
    assert main(['convert', 'imagenet-vid', '--root', str(tmp_path / 'nope'), '--out', str(tmp_path / 'o')]) == 2
    assert 'ImageNet VID root folder not found' in capsys.readouterr().err
