"""YOLOV++ training on its transformer backbones (Swin-T, Swin-B, FocalNet-L: the official
``exps/yolov++/v++_{SwinTiny,SwinBaseX,FocalLarge}_decoupleReg.py``): the config check, the shipped
configs, the backbone's stochastic depth at the official rates, one step of the engine's optimiser
that moves exactly what the official ``get_model`` leaves trainable, and one Swin-T step equal to the
official trainer's (``tests/fixtures/yolovpp_transformer_train/``, README there).
"""
import gzip
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip('timm')

from viddet.config.training import config_from_dict, load_config  # noqa: E402
from viddet.errors import VidDetError  # noqa: E402
from viddet.methods.yolov import YOLOVPP  # noqa: E402
from viddet.models.yolov_loss import assign_batch, train_outputs, yolovpp_losses  # noqa: E402
from viddet.models.yolox import letterbox  # noqa: E402
from viddet.structures import ImageMeta, TrainSample  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / 'fixtures' / 'yolovpp_transformer_train' / 'yolovpp_swintiny_cows4_s128_seed0.json.gz'
CONFIGS = {'swin_tiny': 'yolovpp_swintiny', 'swin_base': 'yolovpp_swinbase', 'focal_large': 'yolovpp_focallarge'}
# the official exp files: blocks per stage, the backbone's drop_path_rate (swin_transfomer.SwinTransformer's
# default 0.2, focal.FocalNet's 0.3; neither exp file nor YOLOPAFPN_Swin / _focal sets another)
OFFICIAL_DEPTHS = {'swin_tiny': (2, 2, 6, 2), 'swin_base': (2, 2, 18, 2), 'focal_large': (2, 2, 18, 2)}
OFFICIAL_DROP_PATH = {'swin_tiny': 0.2, 'swin_base': 0.2, 'focal_large': 0.3}
# basic_lr_per_img x gframe 16 (SwinTiny: yolov_base.py's 0.002 / 64; the others set 0.0005 / 64), max_epoch
OFFICIAL_LR = {'swin_tiny': 0.002 / 64 * 16, 'swin_base': 0.0005 / 64 * 16, 'focal_large': 0.0005 / 64 * 16}
OFFICIAL_EPOCHS = {'swin_tiny': 7, 'swin_base': 7, 'focal_large': 5}
MINIMAL_LIMIT = {'swin_tiny': 50, 'swin_base': 50, 'focal_large': 36}


def tiny_raw(method, backbone):
    return {'model': {'method': method, 'backbone': backbone, 'classes': ['car', 'dog']},
            'data': {'train': [{'ann_file': 'a.json', 'img_prefix': '.', 'load_as_video': True,
                                'ref_sampler': {'num_ref_imgs': 2, 'frame_range': 10, 'method': 'uniform'}}],
                     'scale': [64, 64], 'hsv_prob': 1.0},
            'schedule': {'epochs': 1, 'lr': 1e-3, 'lr_batch': 1, 'warmup_iters': 0, 'policy': 'yolox_cos'},
            'init': {'backbone_weights': 'random'}}


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize('backbone', sorted(CONFIGS))
def test_config_check_takes_yolovpp_transformers_and_refuses_them_for_yolov(backbone):
    assert config_from_dict(tiny_raw('yolovpp', backbone), '<tiny>').model.backbone == backbone
    with pytest.raises(VidDetError) as err:
        config_from_dict(tiny_raw('yolov', backbone), '<tiny>')
    msg = str(err.value)
    assert msg == (f"<tiny>: model.backbone must be one of yolox_s, yolox_l, yolox_x, mobilenetv2, got '{backbone}'")
    assert '\n' not in msg


@pytest.mark.parametrize('backbone', sorted(CONFIGS))
def test_shipped_configs_follow_the_official_recipe(backbone):
    c = load_config(REPO / 'configs' / f'{CONFIGS[backbone]}.yaml')
    assert (c.model.method, c.model.backbone, c.model.backbone_frozen_stages) == ('yolovpp', backbone, None)
    assert c.data.scale == (576, 576) and c.data.flip_ratio == 0.5 and c.data.hsv_prob == 1.0
    r = c.data.train[0].ref_sampler
    assert (r.num_ref_imgs, r.method) == (15, 'uniform')          # gframe 16 of one video
    s = c.schedule
    assert s.lr == pytest.approx(OFFICIAL_LR[backbone]) and s.lr_batch == 1 and s.warmup_iters == 0
    assert (s.policy, s.min_lr_ratio, s.final_epochs, s.nesterov, s.decay_norm_and_bias) == \
        ('yolox_cos', 0.1, 0.52, True, False)
    assert (s.momentum, s.weight_decay, s.grad_clip, s.ema_decay, s.ema_ramp) == (0.9, 5e-4, None, 0.9998, 2000)
    # the nearest whole number of 57,930-sample epochs to the official max_epoch x 15,000 batches
    assert s.epochs == round(OFFICIAL_EPOCHS[backbone] * 15000 / 57930)
    assert c.init.checkpoint is None and c.init.backbone_weights is None


# ------------------------------------------------------------------------------------ the model in training
def drop_rates(body):
    """Each block's stochastic-depth probability, in block order (0 where the block has none)."""
    rates = []
    for stage in body.layers:
        for blk in stage.blocks:
            dp = blk.drop_path if hasattr(blk, 'drop_path') else blk.drop_path1
            rates.append(float(getattr(dp, 'drop_prob', 0.0)))
            if hasattr(blk, 'drop_path2'):
                assert float(getattr(blk.drop_path2, 'drop_prob', 0.0)) == rates[-1]
    return rates


@pytest.mark.parametrize('backbone', sorted(CONFIGS))
def test_the_backbone_keeps_the_official_stochastic_depth_in_train_mode(backbone):
    model = YOLOVPP.build(backbone, 30)
    body = model.backbone.backbone
    expected = torch.linspace(0, OFFICIAL_DROP_PATH[backbone], sum(OFFICIAL_DEPTHS[backbone])).tolist()
    assert [len(s.blocks) for s in body.layers] == list(OFFICIAL_DEPTHS[backbone])
    assert drop_rates(body) == pytest.approx(expected, abs=1e-7)
    assert model.head.minimal_limit == MINIMAL_LIMIT[backbone]
    x = torch.rand(1, 3, 64, 64) * 255
    body.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = body(x)[2]
        torch.manual_seed(1)
        assert not torch.equal(a, body(x)[2])          # residual branches randomly dropped
        body.eval()
        assert torch.equal(body(x)[2], body(x)[2])


def test_swin_b_runs_its_timm_blocks_in_the_official_order_at_other_sizes():
    """Swin-B's timm stages compute the official blocks at 576 only (``timm_swin_matches``); at other
    sizes (multi-scale training) they run in the official order, pad then shift. On a 36 x 36 map (576)
    timm's shifted block equals that order; on a 13 x 13 one (side 416) it does not, and the stage
    gives the official order's result."""
    from viddet.models.yolov_backbones import pad_first_attention
    torch.manual_seed(0)
    body = YOLOVPP.build('swin_base', 30).backbone.backbone.eval()
    stage = body.layers[3]                                                  # 2 blocks, the second shifted by 6
    for side, timm_is_official in ((36, True), (13, False)):
        x = torch.randn(1, 2 * side, 2 * side, 512)
        with torch.no_grad():
            y = stage.downsample(x)
            for i, blk in enumerate(stage.blocks):
                official = y + pad_first_attention(blk.norm1(y), blk.attn, 12, 6 * i)
                official = official + blk.mlp(blk.norm2(official))
                assert torch.allclose(blk(y), official, rtol=1e-4, atol=1e-4) == (timm_is_official or i == 0)
                y = official
            torch.testing.assert_close(body.run_stage(stage, x), y, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        outs = body(torch.rand(1, 3, 160, 160) * 255)
    assert [tuple(o.shape[-2:]) for o in outs] == [(20, 20), (10, 10), (5, 5)]


def tiny_sample(frames=3, side=64):
    """A sample of ``frames`` frames (raw 0..255) with one box each, no seed (no multi-scale)."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(frames, 3, side, side, generator=g) * 60 + 60
    boxes, labels = [], []
    for f in range(frames):
        x, y = 8 + 3 * f, 10 + 2 * f
        imgs[f, :, y:y + 30, x:x + 36] = torch.tensor([200.0, 40.0, 90.0])[:, None, None]
        boxes.append(torch.tensor([[x, y, x + 36, y + 30]], dtype=torch.float32))
        labels.append(torch.tensor([f % 2]))
    meta = ImageMeta((side, side), (side, side), (side, side), np.ones(4, np.float32))
    return TrainSample(imgs[0], imgs[1:], [meta] * frames, boxes[0], labels[0], ref_gt_bboxes=boxes[1:],
                       ref_gt_labels=labels[1:])


def official_frozen(model):
    """The parameters the official ``get_model`` freezes, by module (``backbone.parameters()``, the
    head's ``stems``, ``reg_convs``, ``cls_convs``, ``reg_preds``), and those no official loss reaches
    (``agg``'s box branch and ``agg_iou``'s class branch: computed and dropped; frozen here)."""
    h = model.head
    parts = [model.backbone, h.stems, h.reg_convs, h.cls_convs, h.reg_preds,
             h.agg.linear1_obj, h.agg.linear2_obj, h.agg_iou.linear1, h.agg_iou.linear2]
    return {id(p) for m in parts for p in m.parameters()}


@pytest.mark.parametrize('backbone', sorted(CONFIGS))
def test_one_step_moves_exactly_what_the_official_recipe_trains(backbone):
    from viddet.engine.initial_weights import build_train_model
    from viddet.engine.optim import Updater
    cfg = load_config(REPO / 'configs' / f'{CONFIGS[backbone]}.yaml')
    torch.manual_seed(0)
    model = build_train_model(cfg)
    with torch.no_grad():                          # enough candidates with foreground anchors at 64 px
        for p in model.head.cls_preds:
            p.bias += 3.0
        for p in model.head.obj_preds:
            p.bias += 1.0
    model.train()
    frozen = official_frozen(model)
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if not p.requires_grad} == {n for n, p in named.items() if id(p) in frozen}
    assert any(n.startswith('head.cls_convs2.') for n, p in named.items() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in named.items()}
    neck_bn = model.backbone.C3_p4.conv1.bn.running_mean       # a BatchNorm of the frozen neck
    bn_before = neck_bn.clone()
    updater = Updater(model, cfg.schedule, cfg.schedule.lr, None, torch.device('cpu'))
    losses = model.losses(tiny_sample(), cfg)
    assert float(losses['num_fg']) > 0 and float(losses['loss_refined_cls'].detach()) > 0
    total = sum(v for k, v in losses.items() if 'loss' in k)
    updater.backward(total)
    for n, p in named.items():
        if id(p) in frozen:
            assert p.grad is None, n
        else:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), n
    updater.step(total)
    for n, p in named.items():
        assert torch.equal(p.detach(), before[n]) == (id(p) in frozen), n
    assert not torch.equal(neck_bn, bn_before)      # BatchNorms on batch statistics in train mode, as officially


def test_a_still_image_swin_t_base_loads_for_the_video_fine_tune(tmp_path):
    """The official start: the still-image YOLOX-SwinTiny (``{"model": ...}`` in the official layout,
    without ``cls_convs2`` and the video parts) loads as it is; the video parts keep their init."""
    from viddet.engine.initial_weights import build_train_model, load_finetune_checkpoint
    cfg = load_config(REPO / 'configs' / 'yolovpp_swintiny.yaml')
    torch.manual_seed(1)
    base = {k: v for k, v in YOLOVPP.build('swin_tiny', 30).state_dict().items()
            if not k.startswith(('head.cls_convs2.', 'head.agg', 'head.cls_pred.', 'head.obj_pred.'))}
    assert 'backbone.backbone.layers.0.downsample.reduction.weight' in base        # the official layout
    torch.save({'start_epoch': 7, 'model': base}, tmp_path / 'yolox_swintiny_vid.pth')
    torch.manual_seed(2)
    model = build_train_model(cfg)
    video = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(('head.agg', 'head.cls_convs2.'))}
    report = load_finetune_checkpoint(model, str(tmp_path / 'yolox_swintiny_vid.pth'), cfg)
    assert report.unused == [] and report.reinitialised == []
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(torch.equal(state[k], v) for k, v in video.items())


# ------------------------------------------------------------------------------------ parity of one step
@pytest.fixture(scope='module')
def swin_t_step(parity_checkpoint):
    from conftest import SHARED
    data = SHARED / 'data' / 'mini_vid' / 'Data' / 'VID'
    if not (SHARED / 'parity' / 'yolov' / 'make_checkpoint.py').exists() or not data.exists():
        pytest.skip(f'{SHARED} lacks parity/yolov or data/mini_vid: this test needs the shared folder')
    ref = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    state = torch.load(parity_checkpoint('yolovpp_swintiny.txt', 0, SHARED / 'parity' / 'yolov'),
                       map_location='cpu')['model']
    for k in list(state):
        if k.endswith('relative_position_index'):   # random numbers in the file: keep the model's own index
            del state[k]
        elif k.startswith('head.cls_preds.') and k.endswith('.bias'):
            state[k] = state[k] + ref['cls_bias_shift']
        elif k.startswith('head.obj_preds.') and k.endswith('.bias'):
            state[k] = state[k] + ref['obj_bias_shift']
    model = YOLOVPP.build('swin_tiny', 30)
    model.load_state_dict(state)
    model.freeze_for_training()
    model.train()
    dropped = [m for m in model.modules() if type(m).__name__ == 'DropPath']
    assert len(dropped) == ref['drop_path_off']
    for m in dropped:                               # as the fixture: the stochastic depth off
        m.eval()
    imgs = []
    for f, inp in zip(ref['frames'], ref['inputs']):
        t, _ = letterbox(cv2.imread(str(data / f)), ref['size'])
        assert hashlib.md5(t.numpy().astype(np.uint8).tobytes()).hexdigest() == inp['md5_uint8_chw'], f
        imgs.append(t)
    targets = [torch.tensor(inp['targets'], dtype=torch.float32).reshape(-1, 5) for inp in ref['inputs']]
    feats = model.backbone(torch.stack(imgs))
    losses = yolovpp_losses(model.head, feats, targets)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    with torch.no_grad():
        out = train_outputs(model.head, [f.detach() for f in feats])
    return ref, model, losses, assign_batch(out, targets), out


def test_swin_t_step_assigns_and_selects_as_the_official_trainer(swin_t_step):
    ref, model, _, assignments, out = swin_t_step
    by_frame = {a['frame']: a for a in ref['assignments']}
    for b, a in enumerate(assignments):
        r = by_frame[b]
        assert a.fg_anchors.tolist() == r['fg_anchors'] and a.matched_gt.tolist() == r['matched_gt']
        np.testing.assert_allclose(a.iou_targets.numpy(), r['iou_targets'], rtol=1e-5, atol=1e-6)
    idx = [model.head.select(r) for r in out.rows]
    assert [i.tolist() for i in idx] == ref['selection']['idx']
    assert min(len(i) for i in idx) == 50                          # minimal_limit 50 reached
    pos = np.concatenate([np.isin(i.numpy(), a.fg_anchors.numpy()) for i, a in zip(idx, assignments)])
    assert pos.astype(int).tolist() == ref['selection']['refine_obj_mask']


def test_swin_t_step_losses_and_gradients_equal_the_official_trainer(swin_t_step):
    ref, model, losses, _, _ = swin_t_step
    names = {'iou_loss': 'loss_iou', 'conf_loss': 'loss_obj', 'cls_loss': 'loss_cls',
             'loss_refined_cls': 'loss_refined_cls', 'loss_refined_obj': 'loss_refined_obj'}
    for official, ours in names.items():
        assert float(losses[ours].detach()) == pytest.approx(ref['losses'][official], rel=1e-4, abs=1e-6), ours
    total = sum(float(v.detach()) for k, v in losses.items() if 'loss' in k)
    assert total == pytest.approx(ref['losses']['total_loss'], rel=1e-4)
    assert float(losses['num_fg']) == pytest.approx(ref['losses']['num_fg'], rel=1e-6)
    params = dict(model.named_parameters())
    body, prefix = model.backbone.backbone, 'backbone.backbone.'
    unused = [n for n, g in ref['grads'].items() if g is None]
    frozen = [prefix + body.official_key(n[len(prefix):]) if n.startswith(prefix) else n
              for n, p in params.items() if not p.requires_grad]     # the official names of the body's tensors
    assert sorted(frozen) == sorted(ref['frozen'] + unused)
    for name, g in ref['grads'].items():
        ours = params[name].grad
        if g is None:
            assert ours is None, name
            continue
        assert float(ours.double().norm()) == pytest.approx(g['norm'], rel=1e-3, abs=1e-7), name
        if g['full'] is not None:
            np.testing.assert_allclose(ours.reshape(-1).numpy(), g['full'], rtol=1e-3, atol=1e-6 * max(1.0, g['norm']))
