"""Config loading: YAML + dotted overrides, typed checks with clear messages, missing data paths
reported before training starts (MMTracking's recipe as defaults)."""
import time
from pathlib import Path

import pytest
import torch
import yaml

from train_utils import make_tiny_vid, tiny_config
from viddet import VidDetError
from viddet.cli import main
from viddet.config.files import apply_override, parse_override
from viddet.config.training import Config, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_mmtracking_recipe():
    c = Config()
    s = c.schedule
    assert (s.epochs, s.lr, s.lr_batch, s.momentum, s.weight_decay) == (7, 0.01, 8, 0.9, 1e-4)
    assert (s.warmup_iters, s.warmup_ratio, s.steps, s.gamma, s.grad_clip) == (500, 1 / 3, [2, 5], 0.1, 35.0)
    assert c.data.scale == (1000, 600) and c.data.samples_per_gpu == 1 and c.data.flip_ratio == 0.5
    assert len(c.model.classes) == 30


@pytest.mark.parametrize('name,method,refs', [('single_r50', 'single', None), ('dff_r50', 'dff', 1),
                                              ('fgfa_r50', 'fgfa', 2), ('selsa_r50', 'selsa', 2), ('troi_r50', 'troi', 2)])
def test_shipped_r50_configs(name, method, refs):
    c = load_config(REPO / 'configs' / f'{name}.yaml')
    assert c.model.method == method and c.model.backbone == 'r50'
    assert [t.load_as_video for t in c.data.train] == [True, False]
    assert c.data.train[0].ann_file == 'data/ILSVRC/annotations/imagenet_vid_train.json'
    r = c.data.train[0].ref_sampler
    assert (r.num_ref_imgs if r else None) == refs
    if refs:
        assert r.frame_range == 9 and c.data.train[1].ref_sampler.frame_range == 0
        assert r.method == ('uniform' if method == 'dff' else 'bilateral_uniform')
        assert r.filter_key_img == (method != 'dff')
    s = c.schedule
    assert (s.epochs, s.lr, s.lr_batch, s.steps, s.warmup_iters, s.grad_clip) == (7, 0.01, 8, [2, 5], 500, 35.0)
    with pytest.raises(VidDetError, match='data.train.0.ann_file: file data/ILSVRC'):
        c.check_paths()


@pytest.mark.parametrize('method', ['single', 'dff', 'fgfa', 'selsa'])
def test_shipped_mini_vid_configs(method):
    c = load_config(REPO / 'configs' / 'mini_vid' / f'{method}_mobilenetv2.yaml')
    assert c.model.method == method and c.model.backbone == 'mobilenetv2'
    assert c.data.train[0].img_prefix == '../shared/data/mini_vid/Data/VID'
    assert c.init.backbone_weights == '../shared/weights/mobilenet_v2_imagenet_features.pth'


def parse_test_settings_parse_and_apply():
    assert parse_override('schedule.epochs=3') == ('schedule.epochs', 3)
    assert parse_override('data.scale=[600, 360]') == ('data.scale', [600, 360])
    assert parse_override('init.checkpoint=null') == ('init.checkpoint', None)
    raw = {'data': {'train': [{'ann_file': 'a.json'}]}}
    apply_override(raw, 'data.train.0.ann_file', 'b.json')
    assert raw['data']['train'][0]['ann_file'] == 'b.json'
    c = config_from_dict({}, overrides=['schedule.epochs=3', 'schedule.lr=0.02', 'data.scale=[600,360]',
                                        'model.method=fgfa'])
    assert c.schedule.epochs == 3 and c.schedule.lr == 0.02 and c.data.scale == (600, 360) and c.model.method == 'fgfa'
    with pytest.raises(VidDetError, match='expected KEY=VALUE'):
        parse_override('schedule.epochs')
    with pytest.raises(VidDetError, match='not an index'):
        apply_override({'data': {'train': []}}, 'data.train.3.ann_file', 'x')


@pytest.mark.parametrize('overrides,message', [
    (['schedule.epoch=3'], r'unknown key schedule.epoch \(did you mean schedule.epochs\?\)'),
    (['modle.method=dff'], r'unknown key modle \(did you mean model\?\)'),
    (['schedule.lr=fast'], r"schedule.lr must be a number, got 'fast'"),
    (['schedule.epochs=2.5'], r'schedule.epochs must be an integer, got 2.5'),
    (['data.scale=[600]'], r'data.scale must be a list of 2 integers'),
    (['model.method=yolo'], r'model.method must be one of single, dff, fgfa, selsa, troi'),
    (['model.backbone=r18'], r'model.backbone must be one of'),
    (['schedule.steps=[5,2]'], r'schedule.steps must be increasing'),
    (['data.flip_ratio=2'], r'data.flip_ratio must be in \[0, 1\]'),
    (['data.train=[{ann_file: a.json, img_prefix: b}]', 'model.method=selsa'],
     r'data.train.0.ref_sampler: method selsa needs reference frames'),
    (['data.train=[{ann_file: a.json, img_prefx: b}]'], r'unknown key data.train.0.img_prefx \(did you mean data.train.0.img_prefix\?\)'),
    (['model.backbone_frozen_stages=9'], r'model.backbone_frozen_stages must be in 0..4 for r50'),
    (['schedule.max_nonfinite_steps=0'], r'schedule.max_nonfinite_steps must be >= 1, got 0'),
])
def test_bad_configs_fail_with_clear_messages(overrides, message):
    with pytest.raises(VidDetError, match=message) as e:
        config_from_dict({}, 'my.yaml', overrides)
    assert str(e.value).startswith('my.yaml: ')


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(VidDetError, match='does not exist'):
        load_config(tmp_path / 'nope.yaml')
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: [unclosed\n')
    with pytest.raises(VidDetError, match='bad.yaml: not valid YAML'):
        load_config(bad)
    top = tmp_path / 'list.yaml'
    top.write_text('- 1\n- 2\n')
    with pytest.raises(VidDetError, match='top level must be a mapping'):
        load_config(top)


def test_missing_data_paths_fail_before_training(tmp_path):
    paths = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    cfg = tiny_config(dict(paths, ann_file=str(tmp_path / 'missing.json')))
    cfg.init.backbone_weights = str(tmp_path / 'no_weights.pth')
    t0 = time.perf_counter()
    from viddet.engine.train import train
    with pytest.raises(VidDetError) as e:
        train(cfg, tmp_path / 'work', device='cpu', progress=False)
    msg = str(e.value)
    assert 'data.train.0.ann_file: file' in msg and 'missing.json does not exist' in msg
    assert 'init.backbone_weights: file' in msg and 'no_weights.pth' in msg
    assert time.perf_counter() - t0 < 5          # nothing was built
    assert not (tmp_path / 'work').exists()
    cfg2 = tiny_config(dict(paths, img_prefix=str(tmp_path / 'no_images')))
    with pytest.raises(VidDetError, match='data.train.0.img_prefix: folder .*no_images does not exist'):
        train(cfg2, tmp_path / 'work', device='cpu', progress=False)


def test_cli_train_errors_exit_2_without_traceback(tmp_path, capsys):
    cfg = {'model': {'method': 'single'}, 'data': {'train': [{'ann_file': str(tmp_path / 'x.json'),
                                                                'img_prefix': str(tmp_path)}]}}
    p = tmp_path / 'c.yaml'
    p.write_text(yaml.safe_dump(cfg))
    assert main(['train', str(p), '--set', 'schedule.epochz=1']) == 2
    assert 'unknown key schedule.epochz (did you mean schedule.epochs?)' in capsys.readouterr().err
    assert main(['train', str(p), '--work-dir', str(tmp_path / 'w'), '--no-eval']) == 2
    err = capsys.readouterr().err
    assert 'viddet train: error:' in err and 'x.json does not exist' in err and 'Traceback' not in err


def test_cli_train_runs_tiny_config(tmp_path, capsys):
    torch.set_num_threads(1)
    paths = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    cfg = tiny_config(paths)
    p = tmp_path / 'tiny.yaml'
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    rc = main(['train', str(p), '--work-dir', str(tmp_path / 'w'), '--max-iters', '1', '--no-eval', '--no-progress',
               '--device', 'cpu', '--threads', '1', '--set', 'schedule.seed=4'])
    assert rc == 0
    assert (tmp_path / 'w' / 'iter_1.pth').is_file()
    saved = yaml.safe_load((tmp_path / 'w' / 'config.yaml').read_text())
    assert saved['schedule']['seed'] == 4
