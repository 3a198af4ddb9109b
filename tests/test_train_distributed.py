"""Many processes: under torchrun every rank runs on its own GPU (LOCAL_RANK), and the evaluation
during DDP training runs sharded over all ranks through ``viddet test``'s code — with 2 gloo
processes its detections and metrics equal those of one process, as do a 2-process ``run_test``'s."""
import json
import os
import socket

import pytest
import torch

from train_utils import make_tiny_vid, tiny_config
from viddet.runtime import resolve_device

pytestmark = pytest.mark.usefixtures('one_thread')


def test_local_rank_maps_to_its_gpu(monkeypatch):
    """A stubbed 4-GPU machine: rank 6 of 8 (node 2, local rank 2) gets cuda:2 for cuda and auto."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert resolve_device('cuda') == resolve_device('auto') == torch.device('cuda', 0)
    monkeypatch.setenv('WORLD_SIZE', '8')
    monkeypatch.setenv('RANK', '6')
    monkeypatch.setenv('LOCAL_RANK', '2')
    assert resolve_device('cuda') == resolve_device('auto') == torch.device('cuda', 2)
    assert resolve_device('cuda:1') == torch.device('cuda', 1)        # an explicit index is kept
    assert resolve_device('cpu') == torch.device('cpu')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world, port, paths, val, work, test_dir):
    """One rank: DDP training with its sharded end-of-run evaluation, then a sharded run_test."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from viddet.api import VideoDetector
    from viddet.engine.evaluate import run_test
    from viddet.engine.train import train
    from viddet.evaluation.report import evaluate_and_report
    try:
        train(tiny_config(paths, val=dict(val, mode='offline')), work, max_iters=2, device='cpu', progress=False,
              verbose=False)
        det = VideoDetector.from_checkpoint(os.path.join(work, 'epoch_1.pth'), device='cpu')
        results = run_test(det, val['ann_file'], val['img_prefix'], test_dir, progress=False)
        if rank == 0:
            evaluate_and_report(results, val['ann_file'], out_dir=test_dir, json_path=os.path.join(test_dir, 'm.json'))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_sharded_evaluation_and_test_equal_one_process(tmp_path, capsys):
    import torch.multiprocessing as mp
    from viddet.api import VideoDetector
    from viddet.engine.evaluate import run_test
    from viddet.evaluation.report import evaluate_and_report
    paths = make_tiny_vid(tmp_path / 'data', num_videos=2, num_frames=2)     # 2 steps of batch 2 = 1 epoch
    val = make_tiny_vid(tmp_path / 'val', num_videos=3, num_frames=3, split='val')
    work, sharded = tmp_path / 'work', tmp_path / 'test2'
    mp.spawn(_worker, args=(2, _free_port(), paths, val, str(work), str(sharded)), nprocs=2, join=True)
    det = VideoDetector.from_checkpoint(str(work / 'epoch_1.pth'), device='cpu')
    one = run_test(det, val['ann_file'], val['img_prefix'], tmp_path / 'test1', progress=False)
    metrics = evaluate_and_report(one, val['ann_file'], out_dir=str(tmp_path / 'test1'),
                                  json_path=str(tmp_path / 'test1' / 'm.json'))
    assert {r['image_id'] for r in one} == set(range(1, 10))    # detections in each of the 9 frames
    in_training = work / 'eval_iter_2'
    assert {p.name for p in (in_training / 'videos').glob('.progress*')} == {'.progress0', '.progress1'}
    assert json.loads((in_training / 'results.json').read_text()) == one
    assert json.loads((in_training / 'metrics.json').read_text()) == metrics
    assert {p.name for p in (sharded / 'videos').glob('.progress*')} == {'.progress0', '.progress1'}
    assert json.loads((sharded / 'results.json').read_text()) == one
    assert json.loads((sharded / 'm.json').read_text()) == metrics
