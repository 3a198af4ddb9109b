"""Training that loses nothing and says what it does: a kill (SIGKILL) at any point resumes to the
weights of an uninterrupted run, past a torn checkpoint and stale temporaries, with log and
TensorBoard free of replayed steps; a used work dir, another model's config, a malicious or
finished checkpoint, missing or broken frames each give one clear message; outputs honour the umask."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from train_utils import make_tiny_vid, tiny_config
from viddet import VidDetError
from viddet.cli import main
from viddet.engine.train import train
from viddet.engine.work_dir import checkpoint_candidates, latest_checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(device='cpu', progress=False, evaluate=False)


def _log(work):
    return [json.loads(line) for line in (work / 'train_log.jsonl').read_text().splitlines()]


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _scalars(work, tag='train/loss'):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(work / 'tf_logs'), size_guidance={'scalars': 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path, capsys):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=5)     # 5 steps per epoch, 10 in all
    cfg = tiny_config(data)
    ref = tmp_path / 'ref'
    train(cfg, ref, verbose=False, **QUIET)
    config = tmp_path / 'tiny.yaml'
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    work = tmp_path / 'work'
    env = dict(os.environ, PYTHONPATH=str(REPO / 'src'), OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-m', 'viddet', 'train', str(config), '--work-dir', str(work),
                             '--device', 'cpu', '--threads', '1', '--no-progress', '--no-eval', '--save-interval', '2'],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = work / 'train_log.jsonl'
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 7):   # killed in iteration 8
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, 'the training subprocess made no progress'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    names = {p.name for p in work.glob('*.pth')}
    assert {'epoch_1.pth', 'iter_6.pth'} <= names and 'epoch_2.pth' not in names and 'iter_2.pth' not in names
    logged = len(log.read_text().splitlines())
    # the newest checkpoint torn (as a kill mid-write on a file system without atomic rename would) and a
    # temporary of an interrupted save left behind
    newest, fallback = [p.name for p in checkpoint_candidates(work, 5)][:2]   # e.g. iter_6.pth, epoch_1.pth
    fallback_it = {'epoch_1.pth': 5, 'iter_6.pth': 6}[fallback]
    torn = (work / newest).read_bytes()
    (work / newest).write_bytes(torn[:len(torn) // 2])
    (work / '.iter_8.pth.k2x9_a7q.tmp').write_bytes(b'partial')
    capsys.readouterr()
    r = train(cfg, work, resume=True, save_interval=2, **QUIET)
    out = capsys.readouterr().out
    assert f'--resume: passing over {work / newest} is not a readable PyTorch checkpoint: the file is ' \
           'truncated' in out
    assert f'--resume: continuing from {fallback}, the newest intact checkpoint' in out
    assert 'deleted 1 temporary file(s) of an interrupted save: .iter_8.pth.k2x9_a7q.tmp' in out
    assert f'train_log.jsonl: removed {logged - fallback_it} line(s) logged after iteration {fallback_it} ' \
           '(they are replayed)' in out
    assert r.iters == 10 and r.checkpoint.name == 'epoch_2.pth' and latest_checkpoint(work).name == 'epoch_2.pth'
    a, b = _state(ref / 'epoch_2.pth'), _state(work / 'epoch_2.pth')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {p.name for p in work.glob('*.pth')} == {'epoch_1.pth', 'epoch_2.pth', 'iter_6.pth', 'iter_8.pth'}
    assert not list(work.rglob('*.tmp'))
    la, lb = _log(ref), _log(work)
    assert [x['iter'] for x in lb] == list(range(1, 11))
    assert [x['loss'] for x in la] == [x['loss'] for x in lb]
    tb = _scalars(work)   # TensorBoard hides what the killed run logged after the checkpoint (purge_step)
    assert [s for s, _ in tb] == list(range(1, 11)) and [v for _, v in tb] == [v for _, v in _scalars(ref)]


def test_used_work_dir_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    work = tmp_path / 'w'
    train(tiny_config(data), work, max_iters=1, verbose=False, **QUIET)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    with pytest.raises(VidDetError, match=r'w already holds a training run \(config.yaml, iter_1.pth, last_checkpoint, '
                                          r'tf_logs/, train_log.jsonl …\): continue it with --resume, start a new run with a fresh '
                                          r'--work-dir, or replace it with --overwrite'):
        train(tiny_config(data, seed=9), work, max_iters=2, **QUIET)
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    with pytest.raises(VidDetError, match='give one of them'):
        train(tiny_config(data), work, resume=True, overwrite=True, **QUIET)
    capsys.readouterr()
    train(tiny_config(data, seed=9), work, max_iters=2, overwrite=True, **QUIET)
    assert '--overwrite: deleted the earlier run' in capsys.readouterr().out
    assert [r['iter'] for r in _log(work)] == [1, 2] and not (work / 'iter_1.pth').exists()
    assert len(list((work / 'tf_logs').iterdir())) == 1
    assert torch.load(work / 'epoch_1.pth', weights_only=True)['meta']['config']['schedule']['seed'] == 9


class _Evil:
    """Pickles as a call of os.system: a checkpoint that would run a command if unpickled fully."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_resume_says_what_it_does(tmp_path, capsys):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)     # 2 steps per epoch
    work = tmp_path / 'w'
    train(tiny_config(data, epochs=1), work, verbose=False, **QUIET)
    capsys.readouterr()
    r = train(tiny_config(data, epochs=1), work, resume=True, **QUIET)      # nothing left to do: says so
    assert r.iters == 2 and 'is already at iteration 2 of 2 (finished): nothing to train; raise schedule.epochs' \
        in capsys.readouterr().out
    with pytest.raises(VidDetError, match=r'--resume: .*epoch_1.pth was trained as single \(mobilenetv2, 9 classes\) '
                                          r'but <tiny> trains dff \(mobilenetv2, 9 classes\): resume with the config it '
                                          r'was trained with \(.*config.yaml\) or give another --work-dir'):
        train(tiny_config(data, method='dff', epochs=1), work, resume=True, **QUIET)
    marker = tmp_path / 'pwned'
    torch.save({'state_dict': _Evil(marker), 'optimizer': {}, 'rng': {}, 'epoch': 9, 'iter': 99}, work / 'iter_99.pth')
    r = train(tiny_config(data, epochs=2, lr=0.02), work, resume=True, **QUIET)
    out = capsys.readouterr().out
    assert not marker.exists()
    assert 'iter_99.pth is not a readable PyTorch checkpoint: it contains Python objects other than tensors' in out
    assert '--resume: continuing from epoch_1.pth' in out
    assert ('the config differs from the one epoch_1.pth was trained with (the new values apply from iteration 3 on): '
            'schedule.epochs: 1 -> 2; schedule.lr: 0.01 -> 0.02') in out
    assert r.iters == 4 and r.checkpoint.name == 'epoch_2.pth'
    alone = tmp_path / 'alone'
    alone.mkdir()
    (alone / 'iter_3.pth').write_bytes((work / 'iter_99.pth').read_bytes())
    with pytest.raises(VidDetError, match=r'--resume: no intact checkpoint in .*alone:\n  .*iter_3.pth is not a '
                                          r'readable PyTorch checkpoint'):
        train(tiny_config(data), alone, resume=True, **QUIET)
    assert not marker.exists()


def test_missing_frame_fails_before_training(tmp_path):
    data = make_tiny_vid(tmp_path / 'data', num_videos=2, num_frames=3)
    gone = Path(data['img_prefix']) / 'train' / 'vid1' / '000002.png'
    gone.unlink()
    t0 = time.perf_counter()
    with pytest.raises(VidDetError, match=rf'<tiny>: data.train.0 \(.*train.json\): data.train.0.img_prefix .*: frame '
                                          rf'file {gone} does not exist \(1 of 6 frame files missing or unreadable'):
        train(tiny_config(data, method='fgfa'), tmp_path / 'w', **QUIET)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / 'w').exists()


def test_unreadable_frame_in_a_worker_is_one_line(tmp_path, capsys):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    bad = Path(data['img_prefix']) / 'train' / 'vid0' / '000001.png'
    bad.write_bytes(b'not a png')
    cfg = tiny_config(data)
    cfg.data.workers = 1
    config = tmp_path / 'c.yaml'
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    rc = main(['train', str(config), '--work-dir', str(tmp_path / 'w'), '--no-eval', '--no-progress', '--device', 'cpu'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (f'viddet train: error: {config}: a training item cannot be loaded: {bad}: frame missing '
                               f'or not a readable image')


def test_outputs_honour_the_umask(tmp_path):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    val = make_tiny_vid(tmp_path / 'val', num_videos=1, num_frames=2, split='val')
    cfg = tiny_config(data, val=dict(val, mode='offline'), epochs=1)
    work = tmp_path / 'w'
    old = os.umask(0o027)
    try:
        r = train(cfg, work, save_interval=1, device='cpu', progress=False, verbose=False)
    finally:
        os.umask(old)
    assert r.metrics is not None
    files = [p for p in work.rglob('*') if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {'.pth', '.json', '.jsonl', '.yaml', '.png'} <= kinds and any('tfevents' in p.name for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}
    assert {oct(p.stat().st_mode & 0o777) for p in work.rglob('*') if p.is_dir()} | {oct(work.stat().st_mode & 0o777)} \
        == {oct(0o750)}


def test_keep_checkpoints(tmp_path):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=5)
    work = tmp_path / 'w'
    train(tiny_config(data), work, max_iters=4, save_interval=1, keep_checkpoints=2, verbose=False, **QUIET)
    assert sorted(p.name for p in work.glob('*.pth')) == ['iter_3.pth', 'iter_4.pth']
    assert (work / 'last_checkpoint').read_text() == 'iter_4.pth\n'
    train(tiny_config(data), work, max_iters=7, save_interval=1, keep_checkpoints=0, resume=True, verbose=False,
          **QUIET)
    assert sorted(p.name for p in work.glob('*.pth')) == ['epoch_1.pth', 'iter_3.pth', 'iter_4.pth', 'iter_6.pth',
                                                         'iter_7.pth']
