"""The weight EMA of ``viddet train`` (``schedule.ema_decay``, :mod:`viddet.engine.ema`; YOLOX's
``ModelEMA`` as YOLOV trains with it): the EMA after k updates against hand computations, the ramp,
BatchNorm buffers (floating ones averaged, ``num_batches_tracked`` kept), fp32 copies, rank 0's
EMA on every rank; through the engine: updated after each optimizer step (skipped steps excluded),
saved as the checkpoint's ``state_dict`` that ``load_model`` loads, with the trained weights beside
it, a bit-exact ``--resume``, and no change at all to training when it is off."""
import json
import math
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from test_yolov_train import yolov_tiny_config
from train_utils import make_tiny_vid, tiny_config
from viddet.engine.ema import WeightEMA, build_ema
from viddet.engine.train import train
from viddet.errors import VidDetError

pytestmark = pytest.mark.usefixtures('one_thread')

QUIET = dict(device='cpu', progress=False, evaluate=False, verbose=False, threads=1)
REPO = Path(__file__).resolve().parents[1]


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 1, bias=True), nn.BatchNorm1d(1))


def _set(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# ------------------------------------------------------------------------------------ the update rule
def test_ema_after_k_updates_equals_the_hand_computation():
    # decay 0.5 without ramp: exact binary fractions. weights 1 -> 3 -> 5 -> -1:
    # ema 1, then 0.5 * 1 + 0.5 * 3 = 2, then 0.5 * 2 + 0.5 * 5 = 3.5, then 0.5 * 3.5 - 0.5 = 1.25
    model = _toy()
    _set(model, 1.0)
    ema = WeightEMA(model, 0.5, ramp=0)
    for w, expected in ((3.0, 2.0), (5.0, 3.5), (-1.0, 1.25)):
        _set(model, w)
        ema.update(model)
        assert all(float(ema.state_dict()[k].flatten()[0]) == expected for k in ('0.weight', '0.bias', '1.weight'))
    assert ema.updates == 3 and ema.counter() == dict(updates=3, decay=0.5, ramp=0.0)
    # YOLOX's decay with its ramp, against the recursion in double precision
    _set(model, 0.25)
    ema = WeightEMA(model, 0.9998, ramp=2000)
    expected = 0.25
    for k in range(1, 8):
        w = 0.25 + 0.5 * k
        _set(model, w)
        ema.update(model)
        d = 0.9998 * (1 - math.exp(-k / 2000))
        expected = d * expected + (1 - d) * w
    assert float(ema.state_dict()['0.bias'][0]) == pytest.approx(expected, rel=1e-6)
    assert 3.74 < expected < 3.75   # early on, the ramp keeps the EMA close to the current weights (3.75)


def test_the_ramp_at_known_points():
    ema = WeightEMA(_toy(), 0.9998, ramp=2000)
    assert ema.rate(1) == pytest.approx(0.9998 * 4.99875e-4, rel=1e-5)          # 1 - e^(-1/2000)
    assert ema.rate(2000) == pytest.approx(0.6319941347, rel=1e-9)               # 0.9998 (1 - 1/e)
    assert ema.rate(10 ** 6) == pytest.approx(0.9998, rel=1e-12)
    assert WeightEMA(_toy(), 0.9, ramp=0).rate(1) == 0.9


def test_batchnorm_buffers_as_yolox_treats_them():
    """Running mean / variance are averaged like the weights; the integer ``num_batches_tracked``
    keeps its value from when the EMA was made; frozen parameters are averaged too."""
    model = _toy()
    model[0].weight.requires_grad_(False)
    ema = WeightEMA(model, 0.5, ramp=0)
    model.train()
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]])
    before_mean, before_var = model[1].running_mean.clone(), model[1].running_var.clone()   # 0 and 1
    model(x)
    ema.update(model)
    s = ema.state_dict()
    assert torch.equal(s['1.running_mean'], 0.5 * before_mean + 0.5 * model[1].running_mean)
    assert torch.equal(s['1.running_var'], 0.5 * before_var + 0.5 * model[1].running_var)
    assert not torch.equal(s['1.running_mean'], model[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1 and int(s['1.num_batches_tracked']) == 0
    assert s['1.num_batches_tracked'].dtype == torch.int64
    assert torch.equal(s['0.weight'], model[0].weight)   # unchanged weight: 0.5 w + 0.5 w = w


def test_the_ema_is_fp32_and_a_copy():
    model = _toy().to(torch.bfloat16)
    ema = WeightEMA(model, 0.5, ramp=0)
    assert all(v.dtype == torch.float32 for k, v in ema.state_dict().items() if 'num_batches' not in k)
    _set(model, 2.0)
    assert float(ema.state_dict()['0.bias'][0]) != 2.0   # not the model's tensors
    ema.update(model)
    assert ema.state_dict()['0.bias'].dtype == torch.float32


def test_build_ema_is_off_without_decay_and_resumes_from_a_checkpoint():
    from viddet.config.training import ScheduleConfig
    model = _toy()
    assert build_ema(model, ScheduleConfig()) is None
    s = ScheduleConfig(ema_decay=0.9, ema_ramp=10)
    saved = {k: torch.full_like(v, 7) for k, v in model.state_dict().items()}
    ema = build_ema(model, s, {'state_dict': saved, 'ema': {'updates': 12}, 'iter': 20})
    assert ema.updates == 12 and torch.equal(ema.state_dict()['0.bias'], torch.tensor([7.0]))
    ema = build_ema(model, s, {'state_dict': saved, 'iter': 20})       # trained without EMA until now
    assert ema.updates == 20 and torch.equal(ema.state_dict()['0.bias'], model[0].bias)
    with pytest.raises(VidDetError, match='EMA weights do not match the model'):
        build_ema(model, s, {'state_dict': {'0.bias': saved['0.bias']}, 'ema': {'updates': 1}, 'iter': 1})


def _sync_worker(rank, world, port, out):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        model = _toy()
        _set(model, float(rank + 1))
        synced = WeightEMA(model, 0.5, ramp=0).synced(dist)
        torch.save({k: v.clone() for k, v in synced.items()}, f'{out}/{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_every_rank_evaluates_rank_0s_ema(tmp_path):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / '0.pt'), torch.load(tmp_path / '1.pt')
    assert float(b['0.bias'][0]) == 1.0 and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ the config
@pytest.mark.parametrize('override, message', [
    ('schedule.ema_decay=1.0', r'<tiny yolov>: schedule.ema_decay must be in \(0, 1\) or null'),
    ('schedule.ema_decay=0', r'schedule.ema_decay must be in \(0, 1\)'),
    ('schedule.ema_ramp=-5', 'schedule.ema_ramp must be >= 0'),
    ('schedule.ema_decay=yes', 'schedule.ema_decay'),
])
def test_bad_ema_settings_are_one_clear_error(tmp_path, override, message):
    from viddet.config.training import config_from_dict
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    with pytest.raises(VidDetError, match=message):
        config_from_dict(yolov_tiny_config(data).to_dict(), '<tiny yolov>', [override])


def test_the_yolov_configs_use_the_official_ema_and_the_others_none():
    from viddet.config.training import load_config
    yolov = sorted(REPO.glob('configs/yolov*.yaml')) + sorted(REPO.glob('configs/mini_vid/yolov*.yaml'))
    assert len(yolov) >= 6
    for path in yolov:
        s = load_config(path).schedule
        assert (s.ema_decay, s.ema_ramp) == (0.9998, 2000.0), path
    for name in ('selsa_r50', 'dff_r50', 'mini_vid/selsa_mobilenetv2'):
        assert load_config(REPO / 'configs' / f'{name}.yaml').schedule.ema_decay is None


# ------------------------------------------------------------------------------------ through the engine
def test_engine_ema_after_each_step_is_saved_and_loaded_for_inference(tmp_path):
    """decay 0.5 without ramp: after step k the EMA is (EMA after step k-1 + weights after step k) / 2,
    exactly in fp32; ``num_batches_tracked`` stays at its initial 0; ``load_model`` gets the EMA."""
    from viddet.checkpoints.loading import load_model
    from viddet.engine.initial_weights import build_train_model
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=3)
    cfg = yolov_tiny_config(data, ema_decay=0.5, ema_ramp=0)
    train(cfg, tmp_path / 'w', save_interval=1, keep_checkpoints=0, **QUIET)
    ck = {i: _ckpt(tmp_path / 'w' / name) for i, name in ((1, 'iter_1.pth'), (2, 'iter_2.pth'), (3, 'epoch_1.pth'))}
    torch.manual_seed(cfg.schedule.seed)
    start = build_train_model(cfg).state_dict()
    previous = start
    for i in (1, 2, 3):
        ema, raw = ck[i]['state_dict'], ck[i]['train_state_dict']
        assert ck[i]['ema'] == dict(updates=i, decay=0.5, ramp=0.0)
        for k, v in ema.items():
            if v.dtype.is_floating_point:
                assert torch.equal(v, (previous[k] + raw[k]) / 2), (i, k)
            else:
                assert torch.equal(v, start[k]), (i, k)
        previous = ema
    bn = 'backbone.backbone.stem.conv.bn.'
    assert int(ck[3]['train_state_dict'][bn + 'num_batches_tracked']) == 3
    assert not torch.equal(ck[3]['state_dict'][bn + 'running_mean'], ck[3]['train_state_dict'][bn + 'running_mean'])
    trained = 'head.cls_convs2.0.0.conv.weight'
    assert not torch.equal(ck[3]['state_dict'][trained], ck[3]['train_state_dict'][trained])
    loaded = load_model(str(tmp_path / 'w' / 'epoch_1.pth'), progress=False).model.state_dict()
    assert all(torch.equal(loaded[k], ck[3]['state_dict'][k]) for k in ck[3]['state_dict'] if k in loaded)
    assert torch.equal(loaded[trained], ck[3]['state_dict'][trained])


def test_engine_resume_with_ema_is_bit_exact(tmp_path):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=4)     # 4 steps per epoch
    cfg = yolov_tiny_config(data, 'yolovpp', ema_decay=0.9, ema_ramp=2, epochs=2)
    train(cfg, tmp_path / 'full', max_iters=6, **QUIET)
    train(cfg, tmp_path / 'cut', max_iters=3, **QUIET)
    train(cfg, tmp_path / 'cut', max_iters=6, resume=True, **QUIET)
    full, cut = _ckpt(tmp_path / 'full' / 'iter_6.pth'), _ckpt(tmp_path / 'cut' / 'iter_6.pth')
    assert full['ema'] == cut['ema'] == dict(updates=6, decay=0.9, ramp=2.0)
    for part in ('state_dict', 'train_state_dict'):
        assert full[part].keys() == cut[part].keys()
        assert all(torch.equal(full[part][k], cut[part][k]) for k in full[part]), part
    assert not all(torch.equal(full['state_dict'][k], full['train_state_dict'][k]) for k in full['state_dict'])
    log = [json.loads(line) for line in (tmp_path / 'cut' / 'train_log.jsonl').read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / 'full' / 'train_log.jsonl').read_text().splitlines()]
    assert [r['loss'] for r in log] == [r['loss'] for r in ref]


def test_one_ema_update_per_optimizer_step_with_accumulation(tmp_path):
    data = make_tiny_vid(tmp_path / 'data', num_videos=2, num_frames=2)    # 2 optimizer steps of 2 samples
    train(yolov_tiny_config(data, ema_decay=0.5, ema_ramp=0), tmp_path / 'w', accumulate=2, **QUIET)
    ck = _ckpt(tmp_path / 'w' / 'epoch_1.pth')
    assert ck['iter'] == 2 and ck['ema']['updates'] == 2


def test_skipped_steps_leave_the_ema_unchanged(tmp_path):
    from test_train_engine import StubScaler
    from viddet.engine.train import Trainer
    from viddet.engine.train_options import TrainOptions
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=4)
    options = TrainOptions(max_iters=4, save_interval=1, keep_checkpoints=0, **QUIET)
    t = Trainer(yolov_tiny_config(data, ema_decay=0.5, ema_ramp=0), tmp_path / 'w', options)
    t.setup()
    t.updater.scaler = StubScaler(overflow_at={2, 3})
    t.run()
    ck = {i: _ckpt(tmp_path / 'w' / ('epoch_1.pth' if i == 4 else f'iter_{i}.pth')) for i in (1, 2, 3, 4)}
    assert [ck[i]['ema']['updates'] for i in (1, 2, 3, 4)] == [1, 1, 1, 2]
    for i in (2, 3):
        assert all(torch.equal(ck[1]['state_dict'][k], ck[i]['state_dict'][k]) for k in ck[1]['state_dict'])


def test_without_ema_training_is_unchanged(tmp_path):
    """EMA off: the checkpoint holds the trained weights only (no ``train_state_dict`` / ``ema``), and
    they are bit-identical to the trained weights of the same run with the EMA on (the EMA reads the
    weights, never changes them or the random streams), loss for loss."""
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=3)
    off_cfg = tiny_config(data, epochs=1)
    assert off_cfg.schedule.ema_decay is None
    train(off_cfg, tmp_path / 'off', max_iters=2, **QUIET)
    train(tiny_config(data, epochs=1, ema_decay=0.5, ema_ramp=0), tmp_path / 'on', max_iters=2, **QUIET)
    off, on = _ckpt(tmp_path / 'off' / 'iter_2.pth'), _ckpt(tmp_path / 'on' / 'iter_2.pth')
    assert 'train_state_dict' not in off and 'ema' not in off and on['ema']['updates'] == 2
    assert off['state_dict'].keys() == on['train_state_dict'].keys()
    assert all(torch.equal(off['state_dict'][k], on['train_state_dict'][k]) for k in off['state_dict'])
    oa, ob = off['optimizer']['state'], on['optimizer']['state']
    assert all(torch.equal(oa[k]['momentum_buffer'], ob[k]['momentum_buffer']) for k in oa)
    moved = [k for k, v in off['state_dict'].items() if not torch.equal(v, on['state_dict'][k])]
    assert moved   # the EMA is what the on run saves as its state_dict
    logs = [[json.loads(line)['loss'] for line in (tmp_path / w / 'train_log.jsonl').read_text().splitlines()]
            for w in ('off', 'on')]
    assert logs[0] == logs[1]


def test_training_evaluates_the_ema_weights(tmp_path):
    """The evaluation at the end of training scores the EMA weights: its detections are those of the
    checkpoint's ``state_dict`` scored by ``viddet test``'s code, not those of the trained weights."""
    from viddet.engine.train_eval import evaluate_model
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=3)
    val = make_tiny_vid(tmp_path / 'val', num_videos=1, num_frames=2, split='val')
    cfg = tiny_config(data, val=dict(val, mode='offline'), epochs=1, ema_decay=0.5, ema_ramp=0)
    train(cfg, tmp_path / 'w', **dict(QUIET, evaluate=True))
    ck = _ckpt(tmp_path / 'w' / 'epoch_1.pth')
    during = json.loads((tmp_path / 'w' / 'eval_epoch_1' / 'results.json').read_text())
    assert len(during) > 10   # a COCO results list: detections to compare
    for part, same in (('state_dict', True), ('train_state_dict', False)):
        evaluate_model(ck[part], cfg, tmp_path / part, torch.device('cpu'), progress=False)
        assert (json.loads((tmp_path / part / 'results.json').read_text()) == during) == same, part
