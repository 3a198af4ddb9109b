"""Fine-tuning on classes of one's own (docs/finetuning.md): a checkpoint of another class count is
loaded except for the classifier and box regressor, which are re-initialised and named; the how-to
(convert -> select classes -> check-data -> train -> test -> demo) runs end to end on mini_vid."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from viddet import VID_CLASSES, VidDetError
from viddet.cli import main
from viddet.config.training import load_config
from viddet.engine.initial_weights import build_train_model, init_plan, initialise, resolve_plan
from viddet.methods import build_method
from train_utils import make_tiny_vid, tiny_config

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
HEADS = ['detector.roi_head.bbox_head.fc_cls.weight', 'detector.roi_head.bbox_head.fc_cls.bias',
         'detector.roi_head.bbox_head.fc_reg.weight', 'detector.roi_head.bbox_head.fc_reg.bias']


def _checkpoint(path, method='selsa', backbone='mobilenetv2', classes=VID_CLASSES):
    """An MMTracking-style release file ({'state_dict', 'meta': {'CLASSES'}}) of ``classes``."""
    torch.manual_seed(5)
    state = build_method(method, backbone, len(classes)).state_dict()
    torch.save({'state_dict': state, 'meta': {'CLASSES': list(classes)}}, path)
    return state


def _initialised(cfg):
    lines = []
    model = build_train_model(cfg)
    initialise(model, cfg, resolve_plan(init_plan(cfg)), lines.append)
    return model.state_dict(), '\n'.join(lines)


def test_other_class_count_reinitialises_classifier_and_regressor(tmp_path):
    old = _checkpoint(tmp_path / 'vid30.pth')
    cfg = tiny_config(make_tiny_vid(tmp_path / 'd', 1, 2), method='selsa')
    cfg.model.classes = ['car', 'dog']
    cfg.init.checkpoint = str(tmp_path / 'vid30.pth')
    cfg.init.backbone_weights = None   # the checkpoint has the backbone
    new, msg = _initialised(cfg)
    for k, v in new.items():
        if k not in HEADS:
            assert torch.equal(v, old[k]), k
    assert new[HEADS[0]].shape == (3, 1024) and new[HEADS[2]].shape == (8, 1024)
    assert abs(new[HEADS[0]].std().item() - 0.01) < 0.002 and new[HEADS[1]].abs().max() == 0   # mmdet's init
    assert abs(new[HEADS[2]].std().item() - 0.001) < 0.0002 and new[HEADS[3]].abs().max() == 0
    assert f'loaded {len(new) - 4} of {len(new)} tensors' in msg
    assert ('re-initialised for the 2 classes of model.classes (the checkpoint has 30 classes (airplane, antelope, '
            'bear, bicycle … (+26 more))): detector.roi_head.bbox_head.fc_cls.weight (31, 1024) -> (3, 1024), '
            'detector.roi_head.bbox_head.fc_cls.bias (31,) -> (3,), detector.roi_head.bbox_head.fc_reg.weight '
            '(120, 1024) -> (8, 1024), detector.roi_head.bbox_head.fc_reg.bias (120,) -> (8,)') in msg


def test_same_count_other_names_reinitialises_same_classes_load_everything(tmp_path):
    names = ['car', 'dog']
    old = _checkpoint(tmp_path / 'two.pth', classes=['cat', 'cow'])
    cfg = tiny_config(make_tiny_vid(tmp_path / 'd', 1, 2), method='selsa')
    cfg.model.classes, cfg.init.checkpoint = names, str(tmp_path / 'two.pth')
    new, msg = _initialised(cfg)
    assert not torch.equal(new[HEADS[0]], old[HEADS[0]]) and 'the checkpoint has 2 classes (cat, cow)' in msg
    old = _checkpoint(tmp_path / 'same.pth', classes=names)
    cfg.init.checkpoint = str(tmp_path / 'same.pth')
    new, msg = _initialised(cfg)
    assert all(torch.equal(new[k], old[k]) for k in old) and 're-initialised' not in msg


def test_checkpoint_that_cannot_serve_is_refused(tmp_path):
    cfg = tiny_config(make_tiny_vid(tmp_path / 'd', 1, 2), method='dff')
    _checkpoint(tmp_path / 'selsa.pth')
    cfg.init.checkpoint, cfg.init.flownet_weights = str(tmp_path / 'selsa.pth'), None
    with pytest.raises(VidDetError, match=r'selsa.pth has no weights for motion.\* \(\d+ tensors\): set '
                                          r'init.flownet_weights \(flownet_simple, a file, or random\)'):
        _initialised(cfg)
    cfg.init.flownet_weights = 'random'          # said explicitly: FlowNet random, the rest from the checkpoint
    new, msg = _initialised(cfg)
    assert 'FlowNet: random initial weights' in msg and 'not in the checkpoint' in msg
    torch.save({'state_dict': build_method('selsa', 'r50', 30).state_dict()}, tmp_path / 'r50.pth')
    cfg.init.checkpoint = str(tmp_path / 'r50.pth')
    with pytest.raises(VidDetError, match=r'r50.pth is a SELSA R-50 checkpoint, but model.backbone is mobilenetv2'):
        _initialised(cfg)


def _tool():
    spec = importlib.util.spec_from_file_location('select_classes', REPO / 'tools' / 'select_classes.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_finetuning_how_to_end_to_end_on_mini_vid(tmp_path, shared, capsys):
    """docs/finetuning.md on 3 mini_vid classes, from a 30-class checkpoint (frames 160x96)."""
    root, weights = shared('data', 'mini_vid'), shared('weights', 'mobilenet_v2_imagenet_features.pth')
    vid = root / 'Data' / 'VID'
    ann, mine = tmp_path / 'ann', tmp_path / 'mini3'
    # 1. convert (ILSVRC XML -> COCO-VID), then keep 3 classes: "your own data"
    assert main(['convert', 'imagenet-vid', '--root', str(root), '--out', str(ann), '--splits', 'train', 'val',
                 '--no-progress']) == 0
    tool = _tool()
    assert tool.main([str(ann / 'imagenet_vid_train.json'), '--classes', 'car', 'horse', 'dog',
                      '--out', str(mine / 'train.json')]) == 0
    assert tool.main([str(ann / 'imagenet_vid_val.json'), '--classes', 'car', 'horse', 'dog',
                      '--out', str(mine / 'val.json'), '--max-frames', '6']) == 0
    train_ann = json.loads((mine / 'train.json').read_text())
    assert [c['name'] for c in train_ann['categories']] == ['car', 'horse', 'dog']
    assert sorted(v['name'] for v in train_ann['videos']) == ['train/DAVIS16_car-shadow', 'train/DAVIS16_dog',
                                                              'train/DAVIS16_horsejump-high']
    # 2. check
    assert main(['check-data', str(mine / 'train.json'), '--root', str(vid)]) == 0
    assert main(['check-data', str(mine / 'val.json'), '--root', str(vid)]) == 0
    # 3. train a few steps from a checkpoint of 30 classes
    _checkpoint(tmp_path / 'vid30.pth')
    capsys.readouterr()
    work = tmp_path / 'work'
    sets = [f'data.train.0.ann_file={mine / "train.json"}', f'data.train.0.img_prefix={vid}',
            f'data.val.ann_file={mine / "val.json"}', f'data.val.img_prefix={vid}',
            f'init.checkpoint={tmp_path / "vid30.pth"}', f'init.backbone_weights={weights}',
            'data.scale=[160,96]', 'data.workers=0']
    assert main(['train', str(REPO / 'configs' / 'mini_vid' / 'selsa_mobilenetv2_3cls.yaml'), '--work-dir', str(work),
                 '--max-iters', '2', '--no-eval', '--no-progress', '--device', 'cpu', '--threads', '1']
                + [a for s in sets for a in ('--set', s)]) == 0
    out = capsys.readouterr().out
    assert 're-initialised for the 3 classes of model.classes (the checkpoint has 30 classes' in out
    assert 'detector.roi_head.bbox_head.fc_cls.weight (31, 1024) -> (4, 1024)' in out
    ckpt = torch.load(work / 'iter_2.pth', weights_only=True)
    assert ckpt['meta']['CLASSES'] == ['car', 'horse', 'dog'] and ckpt['meta']['config']['schedule']['epochs'] == 2
    # 4. test on the val part of the 3 classes
    assert main(['test', str(mine / 'val.json'), '--root', str(vid), '--checkpoint', str(work / 'iter_2.pth'),
                 '--out-dir', str(tmp_path / 'test'), '--device', 'cpu', '--threads', '1']) == 0
    metrics = json.loads((tmp_path / 'test' / 'metrics.json').read_text())
    assert 0.0 <= metrics['vid_map'] <= 1.0
    results = json.loads((tmp_path / 'test' / 'results.json').read_text())
    assert results and {r['category_id'] for r in results} <= {1, 2, 3}
    assert {r['image_id'] for r in results} <= {im['id'] for im in json.loads((mine / 'val.json').read_text())['images']}
    # 5. demo on a folder of frames
    assert main(['demo', str(vid / 'val' / 'DAVIS16_car-turn'), '--checkpoint', str(work / 'iter_2.pth'),
                 '--out', str(tmp_path / 'demo.mp4'), '--max-frames', '3', '--device', 'cpu', '--threads', '1']) == 0
    frames = [json.loads(line) for line in (tmp_path / 'demo.jsonl').read_text().splitlines()]
    assert len(frames) == 3 and {n for f in frames for n in f['names']} <= {'car', 'horse', 'dog'}


def test_shipped_finetuning_config_extends_the_mini_vid_one():
    c = load_config(REPO / 'configs' / 'mini_vid' / 'selsa_mobilenetv2_3cls.yaml')
    base = load_config(REPO / 'configs' / 'mini_vid' / 'selsa_mobilenetv2.yaml')
    assert c.model.classes == ['car', 'horse', 'dog'] and c.init.checkpoint == 'work_dirs/mini_vid_selsa/epoch_3.pth'
    assert c.data.train[0].ann_file == 'work_dirs/mini3/train.json' and len(c.data.train) == 1
    assert (c.model.backbone, c.model.rpn_train_proposals, c.data.scale) == \
        (base.model.backbone, base.model.rpn_train_proposals, base.data.scale)
