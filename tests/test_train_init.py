"""Initial weights of training: zoo names (torchvision://resnet50, open-mmlab://resnext101_64x4d,
flownet_simple) downloaded once and checked, their key layout mapping onto the DC5 backbones, the
R-101 / X-101 configs, and no start from random weights unless the config says so."""
import hashlib
import socket
from pathlib import Path

import pytest
import torch
import torchvision

from train_utils import make_tiny_vid, tiny_config
from viddet import VidDetError
from viddet.checkpoints.download import cache_dir, resolve_init_weights
from viddet.checkpoints.zoo import INIT_WEIGHTS
from viddet.cli import main
from viddet.config.training import config_from_dict, load_config
from viddet.engine.initial_weights import init_plan, load_backbone_weights, resolve_plan
from viddet.engine.train import train
from viddet.methods import build_method
from viddet.models.backbones import BACKBONES, build_backbone

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def unreachable(monkeypatch):
    """``$VIDDET_WEIGHTS_BASE`` at a closed port of 127.0.0.1: every download fails at once."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    base = f'http://127.0.0.1:{port}/mirror'
    monkeypatch.setenv('VIDDET_WEIGHTS_BASE', base)
    return base


def test_zoo_names_are_mmtracking_files():
    assert INIT_WEIGHTS == {
        'torchvision://resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
        'torchvision://resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
        'open-mmlab://resnext101_64x4d':
            'https://download.openmmlab.com/pretrain/third_party/resnext101_64x4d-ee2c6f71.pth',
        'flownet_simple': 'https://download.openmmlab.com/mmtracking/pretrained_weights/flownet_simple.pth'}
    assert {b.name: b.imagenet_weights for b in BACKBONES} == {
        'r50': 'torchvision://resnet50', 'r101': 'torchvision://resnet101',
        'x101': 'open-mmlab://resnext101_64x4d', 'mobilenetv2': None}
    # torchvision's ImageNet weights of exactly these files
    assert torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url == INIT_WEIGHTS['torchvision://resnet50']
    assert torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url == INIT_WEIGHTS['torchvision://resnet101']


@pytest.mark.parametrize('name,tv', [('r50', 'resnet50'), ('r101', 'resnet101'), ('x101', 'resnext101_64x4d')])
def test_imagenet_key_layout_maps_onto_dc5_backbones(name, tv):
    """The ImageNet files hold torchvision/mmdet ResNet keys (conv1, bn1, layerL.B.convK/bnK,
    downsample.0/1, fc): every backbone tensor has the same name and shape there, nothing to rename
    (the dilation of layer4 changes no shape); fc.* is the only key left over."""
    with torch.device('meta'):
        ours = build_backbone(name).state_dict()
        theirs = getattr(torchvision.models, tv)().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in theirs.items() if not k.startswith('fc.')}


def test_zoo_file_from_the_cache_loads_into_r50(home, unreachable):
    """A file put at the cache path the offline message names is used as is, and loads."""
    tv = torchvision.models.resnet50()
    dest = cache_dir() / 'resnet50-0676ba61.pth'
    dest.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), dest)
    assert resolve_init_weights('torchvision://resnet50', 'init.backbone_weights') == dest
    model = build_method('single', 'r50', 30)
    lines = []
    missing, unused = load_backbone_weights(model, str(dest), lines.append)
    assert missing == [] and sorted(unused) == ['fc.bias', 'fc.weight']
    assert all(torch.equal(v, tv.state_dict()[k]) for k, v in model.detector.backbone.state_dict().items())
    assert lines == [f'backbone weights: {dest}: loaded 318 tensors; unused (2): fc.weight, fc.bias']


def test_download_once_into_cache_with_hash_check(tmp_path, home, server, monkeypatch):
    payload_path = tmp_path / 'w.pth'
    torch.save({'conv1.weight': torch.ones(2)}, payload_path)
    payload = payload_path.read_bytes()
    good = f'tiny-{hashlib.sha256(payload).hexdigest()[:8]}.pth'
    (server.root / good).write_bytes(payload)
    (server.root / 'tiny-00000000.pth').write_bytes(payload)
    monkeypatch.setitem(INIT_WEIGHTS, 'test://tiny', f'https://example.invalid/models/{good}')
    monkeypatch.setitem(INIT_WEIGHTS, 'test://corrupt', 'https://example.invalid/models/tiny-00000000.pth')
    monkeypatch.setenv('VIDDET_WEIGHTS_BASE', server.base)   # a mirror holding the files side by side
    first = resolve_init_weights('test://tiny', 'init.backbone_weights', progress=False)
    again = resolve_init_weights('test://tiny', 'init.backbone_weights', progress=False)
    assert first == again == cache_dir() / good and first.read_bytes() == payload
    assert server.hits == [f'/{good}']
    with pytest.raises(VidDetError, match=r'SHA-256 \w+… does not start with 00000000'):
        resolve_init_weights('test://corrupt', 'init.backbone_weights', progress=False)
    assert not (cache_dir() / 'tiny-00000000.pth').exists()
    with pytest.raises(VidDetError, match=r"init.flownet_weights: 'flownet_simpel' is neither a file, a URL nor a "
                                          r"known name of initial weights \(torchvision://resnet50, .*, or random\)"):
        resolve_init_weights('flownet_simpel', 'init.flownet_weights')


def _tiny_data_overrides(tmp_path):
    paths = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    return ['--set', f'data.train=[{{ann_file: {paths["ann_file"]}, img_prefix: {paths["img_prefix"]}, '
                     f'ref_sampler: {{num_ref_imgs: 2, frame_range: 2}}}}]', '--set', 'data.val=null']


def test_offline_train_names_the_url_and_the_cache_path(tmp_path, home, unreachable, capsys):
    """``viddet train configs/selsa_r50.yaml --max-iters 2`` without network: one clear line."""
    work = tmp_path / 'work'
    rc = main(['train', str(REPO / 'configs' / 'selsa_r50.yaml'), '--max-iters', '2', '--work-dir', str(work),
               '--device', 'cpu', '--no-progress'] + _tiny_data_overrides(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    assert f'could not download {unreachable}/resnet50-0676ba61.pth' in err
    assert f'put it at {home / "checkpoints" / "resnet50-0676ba61.pth"}, or set init.backbone_weights to the ' \
           'downloaded file' in err
    assert not work.exists()          # nothing was built or written


def test_dff_defaults_to_pretrained_flownet_never_random(tmp_path, home, unreachable):
    cfg = tiny_config(make_tiny_vid(tmp_path / 'data', 1, 2), method='dff')
    cfg.init.flownet_weights = None
    assert init_plan(cfg).flownet == 'flownet_simple'
    with pytest.raises(VidDetError, match=f'could not download {unreachable}/flownet_simple.pth'):
        train(cfg, tmp_path / 'w', device='cpu', progress=False, evaluate=False, verbose=False)
    cfg.model.flownet = 'zero'            # zero flow: no FlowNet weights needed
    assert init_plan(cfg).flownet is None
    cfg.model.flownet, cfg.init.flownet_weights = 'train', 'random'
    assert resolve_plan(init_plan(cfg)).flownet == 'random'


def test_random_backbone_only_when_asked(tmp_path):
    cfg = tiny_config(make_tiny_vid(tmp_path / 'data', 1, 2))
    cfg.init.backbone_weights = None      # mobilenetv2 has no published ImageNet weights
    with pytest.raises(VidDetError, match=r'<tiny>: init.backbone_weights is not set and backbone mobilenetv2 has no '
                                          r'published ImageNet weights: set init.backbone_weights \(or '
                                          r'--backbone-weights\) to a weights file, or to random'):
        train(cfg, tmp_path / 'w', device='cpu', progress=False, evaluate=False)
    assert not (tmp_path / 'w').exists()
    r50 = config_from_dict({'model': {'method': 'selsa'}})
    assert init_plan(r50).backbone == 'torchvision://resnet50' and init_plan(r50).flownet is None
    r50.init.checkpoint = 'selsa_r50'     # fine-tuning: the backbone comes from the checkpoint
    assert init_plan(r50).backbone is None
    with pytest.raises(VidDetError, match='init.flownet_weights is set but method selsa has no FlowNet'):
        init_plan(config_from_dict({'model': {'method': 'selsa'}, 'init': {'flownet_weights': 'flownet_simple'}}))


@pytest.mark.parametrize('method', ['dff', 'fgfa', 'selsa', 'troi'])
@pytest.mark.parametrize('backbone,weights', [('r101', 'torchvision://resnet101'),
                                              ('x101', 'open-mmlab://resnext101_64x4d')])
def test_r101_x101_configs_are_the_r50_ones_with_another_backbone(method, backbone, weights):
    c = load_config(REPO / 'configs' / f'{method}_{backbone}.yaml').to_dict()
    r50 = load_config(REPO / 'configs' / f'{method}_r50.yaml').to_dict()
    assert (c['model'].pop('backbone'), r50['model'].pop('backbone')) == (backbone, 'r50')
    assert (c['init'].pop('backbone_weights'), r50['init'].pop('backbone_weights')) == (weights, 'torchvision://resnet50')
    assert c == r50
    assert r50['init']['flownet_weights'] == ('flownet_simple' if method in ('dff', 'fgfa') else None)


def test_config_base_merges_mappings_replaces_lists_and_refuses_loops(tmp_path):
    (tmp_path / 'a.yaml').write_text('model: {method: fgfa, backbone: r101}\nschedule: {steps: [2, 5], lr: 0.02}\n')
    (tmp_path / 'b.yaml').write_text('base: a.yaml\nmodel: {backbone: x101}\nschedule: {steps: [3]}\n')
    c = load_config(tmp_path / 'b.yaml', ['schedule.epochs=3'])
    assert (c.model.method, c.model.backbone, c.schedule.steps, c.schedule.lr, c.schedule.epochs) == \
        ('fgfa', 'x101', [3], 0.02, 3)
    (tmp_path / 'loop.yaml').write_text('base: loop.yaml\n')
    with pytest.raises(VidDetError, match='"base" chain loops back to itself'):
        load_config(tmp_path / 'loop.yaml')
    (tmp_path / 'orphan.yaml').write_text('base: nope.yaml\n')
    with pytest.raises(VidDetError, match=r'config file .*nope.yaml does not exist \(the base of'):
        load_config(tmp_path / 'orphan.yaml')
