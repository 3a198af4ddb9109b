"""YOLOV / YOLOV++ training: one step's SimOTA assignment, candidates, loss targets, losses and
gradients equal to the official trainer's (fixtures in ``tests/fixtures/yolov_train/``, made by
``tools/parity/yolov_train_step.py``; see the README there), and the units they are made of.
"""
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from viddet.methods.yolov import YOLOV, YOLOVPP
from viddet.models.simota import dynamic_k_matching, pairwise_iou_cxcywh, simota_assign, anchor_grid
from viddet.models.yolov_loss import (assign_batch, iou_loss, train_outputs, yolov_candidate_targets,
                                      yolov_losses, yolovpp_losses)
from viddet.models.yolox import letterbox

pytestmark = pytest.mark.usefixtures('one_thread')

FIXTURES = Path(__file__).parent / 'fixtures' / 'yolov_train'
CASES = sorted(p.stem for p in FIXTURES.glob('*.json'))
METHODS = {'yolov_s': YOLOV, 'yolovpp_s': YOLOVPP}
LOSS_NAMES = {  # official output key -> ours (the official 'cls_loss' of YOLOV is its 2 x refined term)
    'yolov_s': {'iou_loss': 'loss_iou', 'conf_loss': 'loss_obj', 'cls_loss': 'loss_ref'},
    'yolovpp_s': {'iou_loss': 'loss_iou', 'conf_loss': 'loss_obj', 'cls_loss': 'loss_cls',
                  'loss_refined_cls': 'loss_refined_cls', 'loss_refined_obj': 'loss_refined_obj'},
}


def shifted_state(path, ref):
    state = torch.load(path, map_location='cpu')['model']
    for k in state:
        if k.startswith('head.cls_preds.') and k.endswith('.bias'):
            state[k] = state[k] + ref['cls_bias_shift']
        elif k.startswith('head.obj_preds.') and k.endswith('.bias'):
            state[k] = state[k] + ref['obj_bias_shift']
    return state


@pytest.fixture(scope='module')
def step(parity_checkpoint, shared_dir):
    """``run(case)``: (reference JSON, our model after one forward/backward, our losses, our
    assignments, the targets) — computed once per case."""
    done = {}

    def run(case):
        if case in done:
            return done[case]
        ref = json.loads((FIXTURES / f'{case}.json').read_text())
        name = ref['model']
        seed = int(case.rsplit('seed', 1)[1])
        ckpt = parity_checkpoint(f'{name}.txt', seed, shared_dir / 'parity' / 'yolov')
        model = METHODS[name].build('yolox_s', 30)
        model.load_state_dict(shifted_state(ckpt, ref))
        model.freeze_for_training()
        model.train()
        imgs = []
        for f, inp in zip(ref['frames'], ref['inputs']):
            img = cv2.imread(str(shared_dir / 'data' / 'mini_vid' / 'Data' / 'VID' / f))
            t, _ = letterbox(img, ref['size'])
            assert hashlib.md5(t.numpy().astype(np.uint8).tobytes()).hexdigest() == inp['md5_uint8_chw'], f
            imgs.append(t)
        targets = [torch.tensor(inp['targets'], dtype=torch.float32).reshape(-1, 5) for inp in ref['inputs']]
        feats = model.backbone(torch.stack(imgs))
        losses = (yolov_losses if name.startswith('yolov_') else yolovpp_losses)(model.head, feats, targets)
        sum(v for k, v in losses.items() if 'loss' in k).backward()
        with torch.no_grad():
            out = train_outputs(model.head, [f.detach() for f in feats])
            assignments = assign_batch(out, targets)
        done[case] = ref, model, losses, assignments, out, targets
        return done[case]
    return run


@pytest.fixture(scope='module')
def shared_dir():
    from conftest import SHARED
    if not (SHARED / 'parity' / 'yolov' / 'make_checkpoint.py').exists() or not (SHARED / 'data' / 'mini_vid').exists():
        pytest.skip(f'{SHARED} lacks parity/yolov or data/mini_vid: these tests need the shared folder')
    return SHARED


@pytest.mark.parametrize('case', CASES)
def test_simota_assignment_is_the_official_one(step, case):
    ref, _, _, assignments, _, targets = step(case)
    by_frame = {a['frame']: a for a in ref['assignments']}
    ks = iter(ref['dynamic_ks'])
    for b, (a, t) in enumerate(zip(assignments, targets)):
        if len(t) == 0:
            assert b not in by_frame and a.num_fg == 0
            continue
        r = by_frame[b]
        assert a.fg_anchors.tolist() == r['fg_anchors']
        assert a.matched_gt.tolist() == r['matched_gt']
        assert t[a.matched_gt, 0].long().tolist() == r['matched_class']
        np.testing.assert_allclose(a.iou_targets.numpy(), r['iou_targets'], rtol=1e-5, atol=1e-6)
        k = next(ks)
        assert a.num_candidates == k['candidates'] and a.dynamic_ks.tolist() == k['dynamic_k']


@pytest.mark.parametrize('case', CASES)
def test_candidates_and_their_targets_are_the_official_ones(step, case):
    ref, model, _, assignments, out, targets = step(case)
    idx = [model.head.select(r) for r in out.rows]
    assert [i.tolist() for i in idx] == ref['selection']['idx']
    bce = ref['bce_calls']
    if ref['model'].startswith('yolov_'):
        rows = []
        for b, (i, a, t) in enumerate(zip(idx, assignments, targets)):
            tg, pos = yolov_candidate_targets(out.rows[b][i, :4], i, a, t[:, 0], t[:, 1:5], 30)
            rows.append(tg[pos])
        tg = torch.cat(rows)
        assert list(tg.shape) == bce[2]['shape']
        assert torch.nonzero(tg).tolist() == bce[2]['target_nonzero']
        np.testing.assert_allclose(tg[tg != 0].numpy(), bce[2]['target_values'], rtol=1e-5)
    else:
        pos = np.concatenate([np.isin(i.numpy(), a.fg_anchors.numpy()) for i, a in zip(idx, assignments)])
        assert pos.astype(int).tolist() == ref['selection']['refine_obj_mask']
        assert int(pos.sum()) == bce[3]['shape'][0]


@pytest.mark.parametrize('case', CASES)
def test_losses_equal_the_official_ones(step, case):
    ref, _, losses, _, _, _ = step(case)
    for official, ours in LOSS_NAMES[ref['model']].items():
        assert float(losses[ours].detach()) == pytest.approx(ref['losses'][official], rel=1e-4, abs=1e-6), ours
    num_fg = max(sum(a['num_fg'] for a in ref['assignments']), 1)
    assert float(losses['loss_cls'].detach()) == pytest.approx(ref['bce_calls'][1]['loss_sum'] / num_fg, rel=1e-4)
    assert float(losses['loss_iou'].detach()) == pytest.approx(3 * ref['iou_calls'][0]['loss_sum'] / num_fg, rel=1e-4)
    total = sum(float(v.detach()) for k, v in losses.items() if 'loss' in k)
    assert total == pytest.approx(ref['losses']['total_loss'], rel=1e-4)
    assert float(losses['num_fg']) == pytest.approx(ref['losses']['num_fg'], rel=1e-6)


@pytest.mark.parametrize('case', CASES)
def test_gradients_equal_the_official_ones(step, case):
    ref, model, _, _, _, _ = step(case)
    params = dict(model.named_parameters())
    # frozen: the official ones, and (YOLOV++) the branches no loss reaches (no official gradient)
    unused = [n for n, g in ref['grads'].items() if g is None]
    assert sorted(n for n, p in params.items() if not p.requires_grad) == sorted(ref['frozen'] + unused)
    for name, g in ref['grads'].items():
        ours = params[name].grad
        if g is None:
            assert ours is None, name
            continue
        assert float(ours.double().norm()) == pytest.approx(g['norm'], rel=1e-3, abs=1e-7), name
        if g['full'] is not None:
            np.testing.assert_allclose(ours.reshape(-1).numpy(), g['full'], rtol=1e-3, atol=1e-6 * max(1.0, g['norm']))


# ------------------------------------------------------------------------------------ units
def test_pairwise_iou_and_iou_loss_on_known_boxes():
    a = torch.tensor([[5.0, 5.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 10.0, 10.0], [10.0, 5.0, 10.0, 10.0], [30.0, 30.0, 2.0, 2.0]])
    np.testing.assert_allclose(pairwise_iou_cxcywh(a, b).numpy(), [[1.0, 50 / 150, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(iou_loss(a.expand(3, 4), b).numpy(), [0.0, 1 - (1 / 3) ** 2, 1.0], rtol=1e-6)


def test_dynamic_k_takes_the_cheapest_and_resolves_shared_anchors():
    ious = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.7, 0.6, 0.5]])
    cost = torch.tensor([[1.0, 2.0, 5.0, 9.0], [9.0, 1.0, 3.0, 4.0]])
    matched, gt, iou_t, ks = dynamic_k_matching(cost, ious)
    assert ks.tolist() == [1, 1]            # int(1.8) = 1, int(1.8) = 1
    assert matched.tolist() == [True, True, False, False] and gt.tolist() == [0, 1]
    np.testing.assert_allclose(iou_t.numpy(), [0.9, 0.7])
    cost = torch.tensor([[1.0, 2.0, 5.0, 9.0], [9.0, 1.5, 3.0, 4.0]])
    ious = torch.tensor([[0.9, 0.8, 0.5, 0.0], [0.0, 0.9, 0.9, 0.5]])
    matched, gt, _, ks = dynamic_k_matching(cost, ious)
    assert ks.tolist() == [2, 2]            # anchor 1 is wanted by both: box 1 has the lower cost
    assert matched.tolist() == [True, True, True, False] and gt.tolist() == [0, 1, 1]


def test_simota_only_considers_anchors_in_the_box_or_centre_region():
    gx, gy, st = anchor_grid([(8, 8)], [8])
    gt = torch.tensor([[32.0, 32.0, 8.0, 8.0]])
    boxes = torch.cat([(torch.stack([gx, gy], 1) + 0.5) * 8, torch.full((64, 2), 8.0)], 1)
    a = simota_assign(gt, torch.tensor([3]), boxes, torch.zeros(64), torch.zeros(64, 5), gx, gy, st)
    centres = (torch.stack([gx, gy], 1) + 0.5) * 8
    # candidates: centre within 4.5 strides (36 px) of (32, 32) on both axes
    assert a.num_candidates == int(((centres - 32).abs() < 36).all(1).sum())
    # the two anchors whose boxes overlap the box best share its IoU; k = int(sum of top-10 IoUs)
    assert a.num_fg == int(a.dynamic_ks[0]) >= 1 and a.fg_mask.sum() == a.num_fg


# ------------------------------------------------------------------------------------ through the engine
def yolov_tiny_config(paths, method='yolov', frozen=None, **schedule):
    from train_utils import CLASSES
    from viddet.config.training import config_from_dict
    sched = dict(epochs=1, lr=0.01, lr_batch=1, warmup_iters=1, steps=[1], log_interval=1, seed=5)
    sched.update(schedule)
    model = {'method': method, 'backbone': 'yolox_s', 'classes': CLASSES}
    if frozen is not None:
        model['backbone_frozen_stages'] = frozen
    refs = {'num_ref_imgs': 2, 'frame_range': 10, 'filter_key_img': True, 'method': 'uniform'}
    raw = {'model': model,
           'data': {'train': [dict(paths, load_as_video=True, ref_sampler=refs)],
                    'scale': [64, 64], 'workers': 0, 'samples_per_gpu': 1, 'hsv_prob': 1.0},
           'schedule': sched, 'eval': {'interval': 0, 'at_end': False}, 'init': {'backbone_weights': 'random'}}
    return config_from_dict(raw, '<tiny yolov>')


def checkpoint_state(path):
    return torch.load(path, map_location='cpu', weights_only=False)['state_dict']


@pytest.mark.parametrize('method', ['yolov', 'yolovpp'])
def test_engine_trains_only_what_the_official_recipe_trains_and_resumes_exactly(tmp_path, method):
    from train_utils import make_tiny_vid
    from viddet.engine.initial_weights import build_train_model
    from viddet.engine.train import train
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=4)     # 4 steps per epoch
    cfg = yolov_tiny_config(data, method)
    quiet = dict(device='cpu', progress=False, evaluate=False, verbose=False, threads=1)
    train(cfg, tmp_path / 'full', **quiet)
    train(cfg, tmp_path / 'cut', max_iters=2, **quiet)
    train(cfg, tmp_path / 'cut', resume=True, **quiet)
    full, cut = checkpoint_state(tmp_path / 'full' / 'epoch_1.pth'), checkpoint_state(tmp_path / 'cut' / 'epoch_1.pth')
    assert all(torch.equal(full[k], cut[k]) for k in full)
    torch.manual_seed(cfg.schedule.seed)
    start = build_train_model(cfg).state_dict()
    params = dict(build_train_model(cfg).named_parameters())
    assert all(torch.equal(full[k], start[k]) for k, p in params.items() if not p.requires_grad)
    scores = [k for k in params if k.startswith(('head.obj_preds.', 'head.cls_preds.'))]
    assert not any(torch.equal(full[k], start[k]) for k in scores)
    assert not params['backbone.backbone.stem.conv.conv.weight'].requires_grad
    assert params['head.cls_convs2.0.0.conv.weight'].requires_grad
    # frozen BatchNorms still run in train mode: their running statistics move
    assert not torch.equal(full['backbone.backbone.stem.conv.bn.running_mean'],
                           start['backbone.backbone.stem.conv.bn.running_mean'])
    log = [json.loads(line) for line in (tmp_path / 'full' / 'train_log.jsonl').read_text().splitlines()]
    assert len(log) == 4 and all(np.isfinite(x['loss']) for x in log)
    assert ('loss_ref' if method == 'yolov' else 'loss_refined_obj') in log[0]


def test_engine_trains_everything_from_scratch_with_bf16_autocast(tmp_path):
    from train_utils import make_tiny_vid
    from viddet.engine.train import train
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    cfg = yolov_tiny_config(data, frozen=0)
    train(cfg, tmp_path / 'w', device='cpu', progress=False, evaluate=False, verbose=False, threads=1, amp='bf16')
    log = [json.loads(line) for line in (tmp_path / 'w' / 'train_log.jsonl').read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(x['loss']) for x in log)
    state = checkpoint_state(tmp_path / 'w' / 'epoch_1.pth')
    torch.manual_seed(cfg.schedule.seed)
    from viddet.engine.initial_weights import build_train_model
    start = build_train_model(cfg).state_dict()
    stem = 'backbone.backbone.stem.conv.conv.weight'
    assert not torch.equal(state[stem], start[stem])


def test_a_frozen_stage_count_is_refused(tmp_path):
    from train_utils import make_tiny_vid
    from viddet.engine.initial_weights import build_train_model
    from viddet.errors import VidDetError
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    with pytest.raises(VidDetError, match='backbone_frozen_stages of YOLOV is 0 .* or unset'):
        build_train_model(yolov_tiny_config(data, frozen=2))


def test_a_still_image_yolox_base_loads_for_the_video_fine_tune(tmp_path):
    """The official recipe starts from a still-image YOLOX fine-tuned on VID (``{"model": ...}``
    without the video parts): its tensors load as they are, the video parts keep their init."""
    from train_utils import make_tiny_vid
    from viddet.engine.initial_weights import build_train_model, load_finetune_checkpoint
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    cfg = yolov_tiny_config(data)
    torch.manual_seed(1)
    base = {k: v for k, v in YOLOV.build('yolox_s', len(cfg.model.classes)).state_dict().items()
            if not k.startswith(('head.cls_convs2.', 'head.trans.', 'head.linear_pred.'))}
    torch.save({'start_epoch': 7, 'model': base}, tmp_path / 'yoloxs_vid.pth')
    model = build_train_model(cfg)
    video = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('head.trans.')}
    load_finetune_checkpoint(model, str(tmp_path / 'yoloxs_vid.pth'), cfg)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(torch.equal(state[k], v) for k, v in video.items())


# ------------------------------------------------------------------------------------ the official optimiser
def test_yolox_cos_schedule_at_known_points():
    from viddet.engine.optim import LrSchedule
    # YOLOV-L: lr 5e-4, 1 warm-up epoch of 15000 steps (quadratic from 0), cosine to 5e-5 over the next
    # 105000, the last 30000 at 5e-5
    s = LrSchedule(5e-4, [], 0.1, 15000, 1.0, 'yolox_cos', 0.1, 150000, 30000)
    assert s.lr(0, 0) == 0.0 and s.lr(0, 7500) == pytest.approx(5e-4 / 4) and s.lr(0, 15000) == pytest.approx(5e-4)
    assert s.lr(2, 15000 + 52500) == pytest.approx(5e-5 + 0.5 * 4.5e-4)       # half-way: cos = 0
    assert s.lr(2, 119999) == pytest.approx(5e-5, rel=1e-6) and s.lr(2, 120000) == 5e-5 and s.lr(2, 149999) == 5e-5
    assert LrSchedule(5e-4, [], 0.1, 0, 1.0, 'yolox_cos', 0.1, 1000, 0).lr(0, 0) == pytest.approx(5e-4)


def test_official_optimiser_nesterov_and_no_decay_on_norms_and_biases(tmp_path):
    from train_utils import make_tiny_vid
    from viddet.engine.initial_weights import build_train_model
    from viddet.engine.optim import Updater
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    cfg = yolov_tiny_config(data, nesterov=True, decay_norm_and_bias=False, weight_decay=5e-4, policy='yolox_cos')
    model = build_train_model(cfg)
    opt = Updater(model, cfg.schedule, 5e-4, None, torch.device('cpu')).optimizer
    decayed, plain = opt.param_groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert decayed['nesterov'] and decayed['weight_decay'] == 5e-4 and plain['weight_decay'] == 0.0
    assert len(decayed['params']) + len(plain['params']) == len(trainable)
    assert all(p.dim() > 1 for p in decayed['params']) and all(p.dim() == 1 for p in plain['params'])
    assert any(p is model.head.linear_pred.bias for p in plain['params'])
    assert any(p is model.head.cls_convs2[0][0].bn.weight for p in plain['params'])


@pytest.mark.parametrize('override, message', [
    ('schedule.policy=cosine', 'schedule.policy must be step or yolox_cos'),
    ('schedule.final_epochs=1', r'schedule.final_epochs in 0..epochs-1'),
    ('schedule.momentum=0', 'schedule.nesterov needs schedule.momentum > 0'),
])
def test_schedule_options_are_checked(tmp_path, override, message):
    from train_utils import make_tiny_vid
    from viddet.config.training import config_from_dict
    from viddet.errors import VidDetError
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    raw = yolov_tiny_config(data, nesterov=True).to_dict()
    with pytest.raises(VidDetError, match=message):
        config_from_dict(raw, '<tiny yolov>', [override])


def _ddp_worker(rank, world, port, paths, work):
    import os
    from viddet.engine.train import train
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(yolov_tiny_config(paths, 'yolovpp'), work, max_iters=1, device='cpu', progress=False, evaluate=False,
              verbose=False)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path):
    """YOLOV++ under DDP (gloo): frozen and unused parameters do not trip DDP, and the update equals
    one process accumulating the same two samples."""
    import socket
    import torch.multiprocessing as mp
    from train_utils import make_tiny_vid
    from viddet.engine.train import train
    paths = make_tiny_vid(tmp_path / 'data', num_videos=2, num_frames=2)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, paths, str(tmp_path / 'ddp')), nprocs=2, join=True)
    train(yolov_tiny_config(paths, 'yolovpp'), tmp_path / 'acc', max_iters=1, accumulate=2, device='cpu',
          progress=False, evaluate=False, verbose=False, threads=1)
    a, b = checkpoint_state(tmp_path / 'ddp' / 'iter_1.pth'), checkpoint_state(tmp_path / 'acc' / 'iter_1.pth')
    params = dict(YOLOVPP.build('yolox_s', 9).named_parameters())
    for k in params:
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-5), k


def test_multiscale_resizes_frames_and_boxes_together():
    from viddet.models.yolov_loss import multiscale
    imgs = torch.zeros(2, 3, 576, 576)
    imgs[:, :, 100:200, 300:400] = 1.0
    targets = [torch.tensor([[3.0, 350.0, 150.0, 100.0, 100.0]]), torch.zeros((0, 5))]
    sizes = set()
    for seed in range(40):
        out, t = multiscale(imgs, targets, torch.Generator().manual_seed(seed))
        side = out.shape[-1]
        sizes.add(side)
        f = side / 576
        assert t[0][0, 0] == 3.0 and torch.allclose(t[0][0, 1:], torch.tensor([350.0, 150.0, 100.0, 100.0]) * f)
        assert t[1].shape == (0, 5)
        cx, cy = int(350 * f), int(150 * f)
        assert out[0, 0, cy, cx] == 1.0 and out[0, 0, int(50 * f), int(50 * f)] == 0.0   # the box moved with the image
    assert sizes <= set(range(416, 737, 32)) and len(sizes) > 5


# ------------------------------------------------------------------------------------ the MobileNetV2 body
def test_mobilenetv2_body_feeds_raw_bgr_to_torchvision_blocks_at_strides_8_16_32():
    """The body's maps are torchvision's MobileNetV2 blocks 6 / 13 / 17 applied to the ImageNet-
    normalised RGB image, from the family's raw 0..255 BGR input; the neck gives YOLOV-S's channels."""
    from torchvision.models import mobilenet_v2
    from viddet.models.yolov_mobilenet import MobileNetV2Body, mobilenet_pafpn
    torch.manual_seed(0)
    body = MobileNetV2Body().eval()
    reference = mobilenet_v2(weights=None).features.eval()
    reference.load_state_dict({k[len('features.'):]: v for k, v in body.state_dict().items()}, strict=False)
    bgr = torch.rand(1, 3, 64, 96) * 255
    rgb = bgr[:, [2, 1, 0]]
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    x = (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        outs = body(bgr)
        expected = []
        for i in range(18):
            x = reference[i](x)
            expected.append(x)
        neck = mobilenet_pafpn().eval()(bgr)
    for out, i, shape in zip(outs, (6, 13, 17), [(1, 32, 8, 12), (1, 96, 4, 6), (1, 320, 2, 3)]):
        assert out.shape == shape
        torch.testing.assert_close(out, expected[i], rtol=1e-5, atol=1e-5)
    assert [tuple(f.shape) for f in neck] == [(1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]


def test_imagenet_body_state_refuses_weights_of_another_network():
    from viddet.errors import VidDetError
    from viddet.models.yolov_mobilenet import imagenet_body_state
    with pytest.raises(VidDetError, match='r50.pth holds no torchvision MobileNetV2 feature weights'):
        imagenet_body_state({'conv1.weight': torch.zeros(64, 3, 7, 7)}, 'r50.pth')
    with pytest.raises(VidDetError, match='part.pth lacks 305 of the 306 MobileNetV2 body tensors'):
        imagenet_body_state({'features.0.0.weight': torch.zeros(32, 3, 3, 3)}, 'part.pth')
    with pytest.raises(VidDetError, match=r'features.0.0.weight has shape \(32, 3, 5, 5\)'):
        imagenet_body_state({'features.0.0.weight': torch.zeros(32, 3, 5, 5)}, 'big.pth')


def test_mobilenetv2_yolov_trains_from_imagenet_weights_and_round_trips(tmp_path):
    """``backbone: mobilenetv2``: the ImageNet body loads through ``init.checkpoint``, one engine step
    trains the neck, the head and the unfrozen body blocks while the frozen blocks and every body
    BatchNorm statistic keep the ImageNet values, and the checkpoint loads back as that model (method
    and backbone read off its keys)."""
    from conftest import SHARED
    weights = SHARED / 'weights' / 'mobilenet_v2_imagenet_features.pth'
    if not weights.exists():
        pytest.skip(f'{weights} is absent: this test needs the shared weights folder')
    from train_utils import CLASSES, make_tiny_vid
    from viddet.checkpoints.loading import load_model
    from viddet.config.training import config_from_dict
    from viddet.engine.initial_weights import build_train_model
    from viddet.engine.train import train
    from viddet.methods import method_of_keys
    from viddet.methods.yolov import variant_of_state
    from viddet.models.yolov_mobilenet import imagenet_body_state
    imagenet = torch.load(weights, map_location='cpu')
    torch.save(imagenet_body_state(imagenet, str(weights)), tmp_path / 'init.pth')
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    refs = {'num_ref_imgs': 1, 'frame_range': 10, 'filter_key_img': True, 'method': 'uniform'}
    cfg = config_from_dict({
        'model': {'method': 'yolov', 'backbone': 'mobilenetv2', 'classes': CLASSES, 'backbone_frozen_stages': 14},
        'data': {'train': [dict(data, load_as_video=True, ref_sampler=refs)], 'scale': [64, 64], 'workers': 0,
                 'samples_per_gpu': 1},
        'schedule': dict(epochs=1, lr=0.01, lr_batch=1, warmup_iters=1, steps=[1], log_interval=1, seed=5),
        'eval': {'interval': 0, 'at_end': False}, 'init': {'checkpoint': str(tmp_path / 'init.pth')}},
        '<tiny yolov mobilenetv2>')
    train(cfg, tmp_path / 'w', max_iters=1, device='cpu', progress=False, evaluate=False, verbose=False, threads=1)
    state = checkpoint_state(tmp_path / 'w' / 'iter_1.pth')
    torch.manual_seed(cfg.schedule.seed)
    start = build_train_model(cfg).state_dict()
    body = {k: v for k, v in imagenet.items() if k.startswith('features.') and int(k.split('.')[1]) < 18}
    assert len(body) == 306   # the file's 312 tensors less features.18 (conv + BatchNorm: 6)
    for k, v in body.items():
        if int(k.split('.')[1]) < 14 or not k.endswith(('.weight', '.bias')):
            assert torch.equal(state['backbone.backbone.' + k], v), k   # frozen block, or BatchNorm statistics
    assert not torch.equal(state['backbone.backbone.features.17.conv.0.0.weight'],
                           imagenet['features.17.conv.0.0.weight'])
    for k in ('backbone.lateral_conv0.conv.weight', 'head.cls_preds.0.weight', 'head.trans.msa.qkv_cls.weight'):
        assert not torch.equal(state[k], start[k]), k
    assert method_of_keys(state) is YOLOV and variant_of_state(state) == 'mobilenetv2'
    loaded = load_model(str(tmp_path / 'w' / 'iter_1.pth'), progress=False)
    assert type(loaded.model) is YOLOV and loaded.model.variant == 'mobilenetv2'
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())


def test_mobilenetv2_body_loads_from_the_torchvision_file_through_backbone_weights(tmp_path):
    """``init.backbone_weights`` = torchvision's ImageNet MobileNetV2 file initialises the body alone:
    the same model as the converted file through ``init.checkpoint``, the PAFPN at its initialisation;
    a file of another network is refused naming it."""
    from conftest import SHARED
    weights = SHARED / 'weights' / 'mobilenet_v2_imagenet_features.pth'
    if not weights.exists():
        pytest.skip(f'{weights} is absent: this test needs the shared weights folder')
    from train_utils import CLASSES
    from viddet.config.training import config_from_dict, load_config
    from viddet.engine.initial_weights import build_train_model, init_plan, initialise, resolve_plan
    from viddet.errors import VidDetError
    from viddet.models.yolov_mobilenet import imagenet_body_state
    imagenet = torch.load(weights, map_location='cpu')
    torch.save(imagenet_body_state(imagenet, str(weights)), tmp_path / 'converted.pth')

    def initial_state(init, lines=None):
        cfg = config_from_dict({'model': {'method': 'yolov', 'backbone': 'mobilenetv2', 'classes': CLASSES,
                                          'backbone_frozen_stages': 18}, 'init': init}, '<t>')
        torch.manual_seed(0)
        model = build_train_model(cfg)
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        say = (lines if lines is not None else []).append
        initialise(model, cfg, resolve_plan(init_plan(cfg), progress=False), say=say)
        return model.state_dict(), fresh

    lines = []
    direct, fresh = initial_state({'backbone_weights': str(weights)}, lines)
    via_checkpoint, _ = initial_state({'checkpoint': str(tmp_path / 'converted.pth'), 'backbone_weights': None})
    assert direct.keys() == via_checkpoint.keys() and all(torch.equal(direct[k], via_checkpoint[k]) for k in direct)
    body = [k for k in direct if k.startswith('backbone.backbone.')]
    assert len(body) == 306 and all(torch.equal(direct[k], imagenet[k[len('backbone.backbone.'):]]) for k in body)
    rest = [k for k in direct if not k.startswith('backbone.backbone.')]
    assert all(torch.equal(direct[k], fresh[k]) for k in rest)
    assert 'loaded 306 tensors into the MobileNetV2Body (144 tensors of the neck keep their initialisation)' in lines[0]
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7)}, tmp_path / 'resnet.pth')
    with pytest.raises(VidDetError, match='resnet.pth contains no weight of this MobileNetV2Body'):
        initial_state({'backbone_weights': str(tmp_path / 'resnet.pth')})
    partial = {k: v for k, v in imagenet.items() if not k.startswith('features.17.')}
    torch.save(partial, tmp_path / 'partial.pth')
    with pytest.raises(VidDetError, match=r'partial.pth lack \d+ of the 306 tensors of the MobileNetV2Body '
                                          r'\(features.17.conv.0.0.weight'):
        initial_state({'backbone_weights': str(tmp_path / 'partial.pth')})
    shipped = load_config(Path(__file__).parent.parent / 'configs' / 'mini_vid' / 'yolov_mobilenetv2.yaml')
    assert shipped.init.backbone_weights == '../shared/weights/mobilenet_v2_imagenet_features.pth'
    assert shipped.init.checkpoint is None


def test_yolov_x_keeps_120_boxes_per_frame_the_others_50(monkeypatch):
    """The official TrainTransform keeps the first 50 boxes of a frame (yolov_s / yolov_l, YOLOV++);
    YOLOV-X's MosaicDetection_VID wrapper makes its targets with max_labels=120. Boxes whose shorter
    side is <= 1 pixel are dropped before the cap."""
    import viddet.models.yolov_loss as yl
    from viddet.structures import TrainSample
    boxes = torch.tensor([[i, 0.0, i + 10.0, 10.0] for i in range(130)] + [[0.0, 0.0, 0.5, 10.0]])
    labels = torch.arange(131) % 30
    assert len(yl.frame_targets(boxes, labels)) == 50
    rows = yl.frame_targets(boxes, labels, 120)
    assert len(rows) == 120 and rows[:, 1].tolist() == [i + 5.0 for i in range(120)]
    seen = []
    monkeypatch.setattr(yl, 'LOSSES', {yl.YOLOVHead: lambda head, feats, targets: seen.append(len(targets[0]))})

    class Model:
        def __init__(self, variant):
            self.variant, self.head, self.title = variant, object.__new__(yl.YOLOVHead), 'YOLOV'

        def backbone(self, imgs):
            return imgs

    sample = TrainSample(img=torch.zeros(3, 64, 64), ref_imgs=torch.zeros(0, 3, 64, 64), metas=[],
                         gt_bboxes=boxes, gt_labels=labels, ref_gt_bboxes=[], ref_gt_labels=[])
    for variant in ('yolox_s', 'yolox_l', 'yolox_x'):
        yl.sample_losses(Model(variant), sample)
    assert seen == [50, 50, 120]
