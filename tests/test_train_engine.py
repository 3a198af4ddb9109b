"""The training loop on a tiny synthetic video set (96x64 frames, MobileNetV2-lite, random init):
overfitting, bit-exact resume, gradient accumulation = larger batch = DDP, bf16 autocast,
non-finite loss handling, and checkpoints that load for inference."""
import json
import socket

import pytest
import torch

from train_utils import make_tiny_vid, tiny_config
from viddet import VidDetError
from viddet.engine.train import train
from viddet.engine.train_set import epoch_order, sample_seed, step_indices
from viddet.engine.work_dir import latest_checkpoint

# Tiny tensors: one thread avoids OpenMP spin-waiting on the shared cores (40x faster here).
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def data(tmp_path):
    return make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=3)


def _params(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _log(work):
    return [json.loads(line) for line in (work / 'train_log.jsonl').read_text().splitlines()]


def test_data_order_is_layout_independent():
    order = epoch_order(10, 3, 0)
    assert sorted(order) == list(range(10)) and order == epoch_order(10, 3, 0) and order != epoch_order(10, 3, 1)
    assert step_indices(order, 4, 3) == [order[2], order[3], order[4]][0:0] + [order[(12 + i) % 10] for i in range(3)]
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2) != sample_seed(0, 1, 3)


def test_overfit_two_frames_loss_decreases(tmp_path):
    paths = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    cfg = tiny_config(paths, epochs=1, lr=0.02, warmup_iters=1, steps=[100], log_interval=1)
    # the same two frames listed 12 times: 24 steps in one epoch, so one 260 MB checkpoint, not 12
    cfg.data.train = cfg.data.train * 12
    cfg.data.flip_ratio = 0.0
    r = train(cfg, tmp_path / 'work', device='cpu', progress=False, evaluate=False, verbose=False)
    assert sorted(p.name for p in (tmp_path / 'work').glob('*.pth')) == ['epoch_1.pth']
    losses = [rec['loss'] for rec in _log(tmp_path / 'work')]
    assert len(losses) == 24 and r.iters == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)


def test_resume_is_bit_exact(tmp_path, data):
    """4 steps straight vs 2 steps, stop, resume to 4 (crossing the epoch boundary at step 3)."""
    cfg = tiny_config(data, epochs=2)
    a, b = tmp_path / 'a', tmp_path / 'b'
    ra = train(cfg, a, max_iters=4, device='cpu', progress=False, evaluate=False, verbose=False)
    rb1 = train(cfg, b, max_iters=2, device='cpu', progress=False, evaluate=False, verbose=False)
    assert rb1.checkpoint.name == 'iter_2.pth' and latest_checkpoint(b).name == 'iter_2.pth'
    rb2 = train(cfg, b, max_iters=4, resume=True, device='cpu', progress=False, evaluate=False, verbose=False)
    assert ra.checkpoint.name == rb2.checkpoint.name == 'iter_4.pth'
    assert (a / 'epoch_1.pth').is_file() and (b / 'epoch_1.pth').is_file()
    pa, pb = _params(ra.checkpoint), _params(rb2.checkpoint)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    oa = torch.load(ra.checkpoint, weights_only=True)['optimizer']['state']
    ob = torch.load(rb2.checkpoint, weights_only=True)['optimizer']['state']
    for k in oa:
        assert torch.equal(oa[k]['momentum_buffer'], ob[k]['momentum_buffer'])
    la, lb = _log(a), _log(b)
    assert [r['iter'] for r in lb] == [1, 2, 3, 4]
    for x, y in zip(la, lb):   # the losses after resuming are those of the uninterrupted run
        for k in ('loss', 'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'lr'):
            assert x[k] == y[k], (x['iter'], k)


def test_resume_without_checkpoint_fails(tmp_path, data):
    with pytest.raises(VidDetError, match='no checkpoint'):
        train(tiny_config(data), tmp_path / 'empty', resume=True, device='cpu', progress=False, evaluate=False)


def _assert_close_state(pa, pb, atol=2e-6):
    for k in pa:
        if pa[k].is_floating_point():
            assert torch.allclose(pa[k], pb[k], atol=atol, rtol=1e-5), (k, (pa[k] - pb[k]).abs().max())
        else:
            assert torch.equal(pa[k], pb[k]), k


def test_accumulate_2_equals_batch_2(tmp_path):
    paths = make_tiny_vid(tmp_path / 'data', num_videos=2, num_frames=2)
    cfg_batch = tiny_config(paths)
    cfg_batch.data.samples_per_gpu = 2
    r1 = train(cfg_batch, tmp_path / 'batch', max_iters=2, device='cpu', progress=False, evaluate=False, verbose=False)
    r2 = train(tiny_config(paths), tmp_path / 'acc', max_iters=2, accumulate=2, device='cpu', progress=False,
               evaluate=False, verbose=False)
    p1, p2 = _params(r1.checkpoint), _params(r2.checkpoint)
    _assert_close_state(p1, p2)
    # and it really moved: differs from a batch-1 run of the same length
    r3 = train(tiny_config(paths), tmp_path / 'b1', max_iters=2, device='cpu', progress=False, evaluate=False,
               verbose=False)
    p3 = _params(r3.checkpoint)
    assert not torch.allclose(p1['detector.roi_head.bbox_head.fc_cls.weight'], p3['detector.roi_head.bbox_head.fc_cls.weight'])
    for x, y in zip(_log(tmp_path / 'batch'), _log(tmp_path / 'acc')):
        assert x['loss'] == pytest.approx(y['loss'], rel=1e-5) and x['lr'] == y['lr']


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, paths, work):
    import os
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(tiny_config(paths), work, max_iters=2, device='cpu', progress=False, evaluate=False, verbose=False)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path):
    import torch.multiprocessing as mp
    paths = make_tiny_vid(tmp_path / 'data', num_videos=2, num_frames=2)
    mp.spawn(_ddp_worker, args=(2, _free_port(), paths, str(tmp_path / 'ddp')), nprocs=2, join=True)
    r = train(tiny_config(paths), tmp_path / 'acc', max_iters=2, accumulate=2, device='cpu', progress=False,
              evaluate=False, verbose=False)
    ddp_ckpt = latest_checkpoint(tmp_path / 'ddp')
    assert ddp_ckpt.name == r.checkpoint.name == 'epoch_1.pth'   # 4 samples / batch 2 = 2 steps per epoch
    _assert_close_state(_params(ddp_ckpt), _params(r.checkpoint))
    assert torch.load(ddp_ckpt, weights_only=True)['total_batch'] == 2


def test_bf16_autocast_step_on_cpu(tmp_path, data):
    r = train(tiny_config(data), tmp_path / 'amp', max_iters=2, amp='bf16', device='cpu', progress=False,
              evaluate=False, verbose=False)
    assert r.iters == 2
    assert all(v == v and abs(v) != float('inf') for v in r.last_losses.values())
    with pytest.raises(VidDetError, match='bf16'):
        train(tiny_config(data), tmp_path / 'fp16', max_iters=1, amp='fp16', device='cpu', progress=False,
              evaluate=False)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=5)   # 5 steps per epoch
    work = tmp_path / 'w'
    train(tiny_config(data), work, max_iters=2, device='cpu', progress=False, evaluate=False, verbose=False)
    good = (work / 'iter_2.pth').read_bytes()
    cfg = tiny_config(data, lr=1e30, warmup_iters=0, max_nonfinite_steps=2)
    cfg.schedule.grad_clip = None
    # step 3 blows the weights up; steps 4 and 5 have NaN losses: skipped, and the second one stops
    with pytest.raises(VidDetError, match=r'non-finite loss at iteration 5 \(epoch 1, step 5\), the last of 2 such '
                                          r'steps in a row \(iterations 4-5, skipped; .*loss_\w+ = (nan|inf)') as e:
        train(cfg, work, max_iters=6, resume=True, device='cpu', progress=False, evaluate=False, verbose=False)
    assert 'iter_2.pth' in str(e.value)
    log = _log(work)
    assert [r['iter'] for r in log] == [1, 2, 3, 4] and [r['skipped'] for r in log] == [0, 0, 0, 1]
    assert 'loss' in log[2] and 'loss' not in log[3]     # a skipped step's losses are not averaged in
    assert (work / 'iter_2.pth').read_bytes() == good
    assert latest_checkpoint(work).name == 'iter_2.pth'
    assert torch.load(work / 'iter_2.pth', weights_only=True)['iter'] == 2


def test_checkpoint_loads_for_inference_and_evaluates(tmp_path, data):
    from viddet.api import VideoDetector
    val = make_tiny_vid(tmp_path / 'val', num_videos=1, num_frames=3, split='val')
    cfg = tiny_config(data, method='dff', val=dict(val, mode='offline'), epochs=2)
    r = train(cfg, tmp_path / 'w', device='cpu', progress=False, verbose=False, val_interval=1)
    ck = torch.load(r.checkpoint, weights_only=True)
    assert ck['meta']['method'] == 'dff' and ck['meta']['backbone'] == 'mobilenetv2'
    assert ck['meta']['CLASSES'][:2] == ['airplane', 'antelope'] and ck['meta']['config']['schedule']['epochs'] == 2
    assert {'optimizer', 'scheduler', 'rng', 'epoch', 'iter'} <= set(ck)
    assert any(k.startswith('motion.') for k in ck['state_dict'])
    det = VideoDetector.from_checkpoint(str(r.checkpoint), device='cpu')
    assert det.method == 'dff' and len(det.class_names) == len(cfg.model.classes)
    assert r.metrics is not None and 0.0 <= r.metrics['vid_map'] <= 1.0
    for e in (1, 2):   # --val-interval 1: after epoch 1 and at the end
        assert (tmp_path / 'w' / f'eval_epoch_{e}' / 'metrics.json').is_file()
    assert list((tmp_path / 'w' / 'tf_logs').iterdir())


class StubScaler:
    """``torch.amp.GradScaler``'s interface on the CPU: at the given optimizer steps (1-based) the
    scaled gradients overflow (an inf is put in), as fp16 gradients under too large a scale do;
    such a step is skipped and the scale halved, like GradScaler's."""

    def __init__(self, overflow_at, scale=512.0):
        self.overflow_at, self.value, self.calls, self.found_inf = set(overflow_at), scale, 0, False

    def scale(self, loss):
        return loss * self.value

    def unscale_(self, optimizer):
        self.calls += 1
        grads = [p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
        if self.calls in self.overflow_at:
            grads[0].view(-1)[0] = float('inf')
        for g in grads:
            g.div_(self.value)
        self.found_inf = not all(bool(torch.isfinite(g).all()) for g in grads)

    def step(self, optimizer):
        if not self.found_inf:
            optimizer.step()

    def update(self):
        self.value /= 2 if self.found_inf else 1

    def get_scale(self):
        return self.value

    def state_dict(self):
        return {'scale': self.value}

    def load_state_dict(self, state):
        self.value = state['scale']


def test_fp16_overflow_is_a_skipped_step_not_an_error(tmp_path):
    from viddet.engine.train import Trainer
    from viddet.engine.train_options import TrainOptions
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=5)
    work = tmp_path / 'w'
    cfg = tiny_config(data, max_nonfinite_steps=1)     # a non-finite *loss* would stop at once
    options = TrainOptions(max_iters=4, save_interval=1, keep_checkpoints=0, device='cpu', progress=False,
                           evaluate=False, verbose=False)
    t = Trainer(cfg, work, options)
    t.setup()
    t.updater.scaler = StubScaler(overflow_at={2, 3})
    assert t.run().iters == 4
    ckpt = {i: torch.load(work / f'iter_{i}.pth', weights_only=True) for i in (1, 2, 3, 4)}
    for a, b, same in ((1, 2, True), (2, 3, True), (3, 4, False)):
        pa, pb = ckpt[a]['state_dict'], ckpt[b]['state_dict']
        assert all(torch.equal(pa[k], pb[k]) for k in pa) == same, (a, b)
        ma = ckpt[a]['optimizer']['state']
        assert all(torch.equal(ma[k]['momentum_buffer'], ckpt[b]['optimizer']['state'][k]['momentum_buffer'])
                   for k in ma) == same
    log = _log(work)
    assert [r['skipped'] for r in log] == [0, 1, 1, 0] and [r['loss_scale'] for r in log] == [512, 256, 128, 128]
    assert all('loss' in r for r in log)                 # the losses were finite: logged
    assert ckpt[4]['scaler'] == {'scale': 128.0}


def test_host_syncs_do_not_grow_with_micro_steps(tmp_path, monkeypatch):
    """Losses stay on the device between log lines: the trainer's own transfers to the host
    (``.item()``, ``float()``, ``.tolist()``) are as many with 3 micro-batches per step as with 1."""
    import sys

    from viddet.engine import checkpointer, optim, train as engine, train_eval, train_log, train_set
    trainer_files = {m.__file__ for m in (engine, checkpointer, optim, train_eval, train_log, train_set)}
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=3)
    counts = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a):
            if sys._getframe(1).f_code.co_filename in trainer_files:
                counts[-1] += 1
            return original(self, *a)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for name in ('item', '__float__', 'tolist'):
        counting(name)
    for acc in (1, 3):
        counts.append(0)
        train(tiny_config(data, log_interval=3), tmp_path / f'a{acc}', accumulate=acc, max_iters=3, device='cpu',
              progress=False, evaluate=False, verbose=False)
    assert counts[0] == counts[1] > 0
    # a skip check per step, one log line (losses, gradient norm), the epoch's data order, the result's 6 losses
    assert counts[0] == 3 + 2 + 1 + 6
