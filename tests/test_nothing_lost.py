"""Nothing lost when a run is interrupted, collides with another, runs out of disk or is given a
location holding other files (issue 25): SIGTERM is Ctrl-C for every command (exit 143 / 130),
``train`` saves a checkpoint when interrupted and says how to resume, every output location is
locked against a second run, ``--overwrite`` deletes only what a run wrote, ``test --resume`` refuses
another checkpoint, outputs are checked before the work, and quiet wrong answers are said."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from train_utils import make_tiny_vid, tiny_config
from viddet.cli import main
from viddet.data.check import check_data
from viddet.engine.evaluate import run_test
from viddet.engine.train import train
from viddet.errors import VidDetError
from viddet.interrupts import Interrupted, deferred, handle_interrupts, pending, clear_pending
from viddet.locks import output_lock

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / 'src'), OMP_NUM_THREADS='1')
QUIET = dict(device='cpu', progress=False, evaluate=False, threads=1)


def _spawn(*args):
    return subprocess.Popen([sys.executable, '-m', 'viddet', *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(proc, ready, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f'ended before {what}: ' + proc.stderr.read().decode()
        assert time.monotonic() < deadline, f'no {what} in {timeout} s'
        time.sleep(0.02)


def _stop(proc, signum, timeout=120):
    proc.send_signal(signum)
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return rc, err


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


# ---------------------------------------------------------------- 1. interrupts and concurrent runs
def test_interrupts_module_maps_sigterm_to_ctrl_c_and_defers_inside_a_step():
    with handle_interrupts():
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert e.value.signum == signal.SIGTERM and isinstance(e.value, KeyboardInterrupt)
        clear_pending()
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)   # remembered, not raised
            time.sleep(0.05)
            assert pending() == signal.SIGINT
            with pytest.raises(Interrupted):      # a second one stops at once
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert clear_pending() == signal.SIGINT


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_interrupted_train_saves_a_checkpoint_and_resumes_to_the_uninterrupted_run(signum, tmp_path):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=8)   # 8 steps per epoch, 16 in all
    cfg = tiny_config(data)
    config = tmp_path / 'tiny.yaml'
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    work = tmp_path / 'work'
    proc = _spawn('train', config, '--work-dir', work, '--device', 'cpu', '--threads', '1', '--no-progress',
                  '--no-eval')   # no --save-interval: before the fix nothing was saved before epoch 1's end
    _wait_for(proc, lambda: _lines(work / 'train_log.jsonl') >= 2, 'training steps')
    rc, err = _stop(proc, signum)
    assert rc == 128 + signum, err
    done = _lines(work / 'train_log.jsonl')
    saved = work / f'iter_{done}.pth' if done % 8 else work / f'epoch_{done // 8}.pth'
    assert saved.is_file(), (sorted(p.name for p in work.iterdir()), err)
    assert torch.load(saved, weights_only=False)['iter'] == done
    name = signal.Signals(signum).name
    assert f'viddet train: interrupted ({name}) at iteration {done}; kept {saved}: continue with\n' \
           f'  viddet train {config} --work-dir {work} --resume' in err
    assert not (work / '.viddet.lock').exists()
    if signum == signal.SIGTERM:   # the saved state continues to exactly the uninterrupted run
        r = train(cfg, work, resume=True, verbose=False, **QUIET)
        ref = train(cfg, tmp_path / 'ref', verbose=False, **QUIET)
        a = torch.load(r.checkpoint, weights_only=False)['state_dict']
        b = torch.load(ref.checkpoint, weights_only=False)['state_dict']
        assert r.iters == ref.iters == 16 and all(torch.equal(a[k], b[k]) for k in a)


def _frames(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f'{i:06d}.png'), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return folder


def test_sigterm_to_demo_keeps_a_playable_partial_video_and_exits_143(tmp_path):
    frames = _frames(tmp_path / 'frames', 400)
    out = tmp_path / 'o.mp4'
    proc = _spawn('demo', frames, '--random-weights', '--method', 'single', '--backbone', 'mobilenetv2',
                  '--device', 'cpu', '--threads', '1', '--mode', 'online', '--out', out)
    _wait_for(proc, lambda: _lines(tmp_path / 'o.partial.jsonl') >= 3, 'detected frames')
    rc, err = _stop(proc, signal.SIGTERM)
    assert rc == 143, err
    assert 'viddet demo: stopped (SIGTERM); kept the' in err
    assert f'{tmp_path / "o.partial.mp4"} (' in err and 'viddet demo: interrupted (SIGTERM)' in err
    cap = cv2.VideoCapture(str(tmp_path / 'o.partial.mp4'))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n >= 3 and not out.exists()
    assert not list(tmp_path.glob('*.lock'))


@pytest.fixture(scope='module')
def vid(tmp_path_factory):
    return make_tiny_vid(tmp_path_factory.mktemp('vid'), num_videos=40, num_frames=3, split='val')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    from viddet.methods import build_method
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ck') / 'single.pth'
    torch.save({'state_dict': build_method('single', 'mobilenetv2').state_dict(),
                'meta': {'config': {'data': {'scale': [96, 64]}}}}, path)
    return path


def test_ctrl_c_during_test_exits_130_and_keeps_the_finished_videos(vid, checkpoint, tmp_path):
    out = tmp_path / 'out'
    proc = _spawn('test', vid['ann_file'], '--root', vid['img_prefix'], '--checkpoint', checkpoint, '--device', 'cpu',
                  '--threads', '1', '--out-dir', out)
    _wait_for(proc, lambda: (out / 'videos' / '000001.json').exists(), 'saved videos')
    rc, err = _stop(proc, signal.SIGINT)
    assert rc == 130, err
    assert 'viddet test: interrupted\n  ' in err and 'finished video(s) of this run are saved in' in err
    assert not (out / 'results.json').exists() and not (out / '.viddet.lock').exists()


def test_a_second_run_into_a_locked_location_is_refused_naming_the_first(tmp_path, vid, checkpoint, capsys):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    work = tmp_path / 'work'
    with output_lock(work, f'--work-dir {work}', is_dir=True):
        assert (work / '.viddet.lock').read_text().startswith(f'pid {os.getpid()}: ')
    assert not work.exists()   # made for the lock, left empty: removed again
    (tmp_path / 'c.yaml').write_text(yaml.safe_dump(tiny_config(data).to_dict()))
    # another process holds them: train, test and demo are refused with the holder's pid
    lock_holder = ('import sys, time; from viddet.locks import output_lock\n'
                   'with output_lock(sys.argv[1], "x", is_dir=sys.argv[2] == "dir"):\n'
                   '    print("held", flush=True); time.sleep(60)\n')
    out_dir, video = tmp_path / 'test_out', tmp_path / 'demo.mp4'
    for location, kind in ((work, 'dir'), (out_dir, 'dir'), (video, 'file'), (video.with_suffix('.jsonl'), 'file')):
        other = subprocess.Popen([sys.executable, '-c', lock_holder, str(location), kind], env=ENV,
                                 stdout=subprocess.PIPE)
        try:
            assert other.stdout.readline() == b'held\n'
            capsys.readouterr()
            if location == work:
                rc = main(['train', str(tmp_path / 'c.yaml'), '--work-dir', str(work), '--device', 'cpu'])
                label = f'--work-dir {work}'
            elif location == out_dir:
                rc = main(['test', vid['ann_file'], '--root', vid['img_prefix'], '--checkpoint', str(checkpoint),
                           '--device', 'cpu', '--out-dir', str(out_dir)])
                label = f'--out-dir {out_dir}'
            else:
                frames = tmp_path / 'frames'
                if not frames.exists():
                    _frames(frames, 2)
                rc = main(['demo', str(frames), '--random-weights', '--method', 'single', '--backbone', 'mobilenetv2',
                           '--device', 'cpu', '--out', str(video)])
                label = f'{"--out" if kind == "file" and location == video else "--json"} {location}'
            err = capsys.readouterr().err
            assert rc == 2 and f'{label} is in use by another viddet run (pid {other.pid}: ' in err, err
        finally:
            other.kill()
            other.wait()
            other.stdout.close()
    assert not out_dir.joinpath('results.json').exists() and not video.exists()


def test_resume_after_a_kill_during_the_first_save_says_what_to_do(tmp_path, capsys):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    work = tmp_path / 'w'
    train(tiny_config(data), work, max_iters=1, verbose=False, **QUIET)
    for p in work.glob('*.pth'):   # as a kill -9 inside the first checkpoint's write leaves it
        p.unlink()
    (work / 'last_checkpoint').unlink()
    (work / '.iter_1.pth.abcd1234.tmp').write_bytes(b'half a checkpoint')
    with pytest.raises(VidDetError, match=r'--resume: no checkpoint in .*w \(the run was stopped while it saved its '
                                          r'first one; deleted the unfinished file\(s\) \.iter_1\.pth\.abcd1234\.tmp\): '
                                          r'nothing to continue from; start the run afresh there with --overwrite'):
        train(tiny_config(data), work, resume=True, **QUIET)
    assert not list(work.glob('*.tmp'))
    with pytest.raises(VidDetError, match=r'already holds a training run .*replace it with --overwrite'):
        train(tiny_config(data), work, **QUIET)
    train(tiny_config(data), work, overwrite=True, max_iters=1, verbose=False, **QUIET)
    assert (work / 'iter_1.pth').is_file()


# ---------------------------------------------------------------- 2. --overwrite and --resume check what they touch
def test_overwrite_deletes_only_what_a_run_wrote(tmp_path, capsys):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    user = tmp_path / 'userdir'
    user.mkdir()
    (user / 'config.yaml').write_text('my own config\n')
    with pytest.raises(VidDetError, match=r'--overwrite deletes only what a viddet training run wrote, and .*userdir '
                                          r'also holds config.yaml \(it holds no run: no viddet_run.json\)'):
        train(tiny_config(data), user, overwrite=True, max_iters=1, **QUIET)
    with pytest.raises(VidDetError, match=r'userdir holds config.yaml, which a training run would overwrite and no '
                                          r'viddet run wrote'):
        train(tiny_config(data), user, max_iters=1, **QUIET)
    assert (user / 'config.yaml').read_text() == 'my own config\n'
    work = tmp_path / 'run'
    train(tiny_config(data), work, max_iters=1, verbose=False, **QUIET)
    manifest = json.loads((work / 'viddet_run.json').read_text())
    assert manifest['written_by'] == 'viddet train' and 'epoch_*.pth' in manifest['outputs']
    (work / 'notes.txt').write_text('mine')
    with pytest.raises(VidDetError, match=r'run also holds notes.txt: move those away'):
        train(tiny_config(data), work, overwrite=True, max_iters=1, **QUIET)
    assert (work / 'iter_1.pth').is_file()
    (work / 'notes.txt').unlink()
    capsys.readouterr()
    train(tiny_config(data, seed=5), work, overwrite=True, max_iters=1, **QUIET)
    assert '--overwrite: deleted the earlier run in' in capsys.readouterr().out


def test_test_resume_with_another_checkpoint_is_refused(vid, checkpoint, tmp_path):
    from viddet.api import VideoDetector
    out = tmp_path / 'r'
    run_test(VideoDetector.from_checkpoint(str(checkpoint), device='cpu'), vid['ann_file'], vid['img_prefix'], out,
             progress=False, max_videos=1)
    record = json.loads((out / 'run.json').read_text())
    import hashlib
    assert record['checkpoint_sha256'] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    other = tmp_path / 'other.pth'
    state = torch.load(checkpoint, weights_only=False)
    state['state_dict'] = {k: v + 1 if v.is_floating_point() else v for k, v in state['state_dict'].items()}
    torch.save(state, other)
    with pytest.raises(VidDetError, match=r'--resume: .* was made with other settings \(checkpoint_sha256 differ: '
                                          rf".*'checkpoint': '{checkpoint}'.* there vs .*'checkpoint': '{other}'.* now\)"):
        run_test(VideoDetector.from_checkpoint(str(other), device='cpu'), vid['ann_file'], vid['img_prefix'], out,
                 progress=False, max_videos=1, resume=True)


# ---------------------------------------------------------------- 3. outputs checked before the work
def test_outputs_of_convert_eval_and_benchmark_are_checked_before_the_work(tmp_path, capsys):
    ro = Path('/proc')   # a folder that accepts no new file, also for root
    (tmp_path / 'file').write_text('x')
    cases = [
        (['convert', 'imagenet-vid', '--root', str(tmp_path / 'nowhere'), '--out', str(ro / 'ann')],
         f'--out {ro / "ann"}: cannot create files in {ro}'),
        (['convert', 'imagenet-vid', '--root', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'file')],
         f'--out {tmp_path / "file"}: is a file, not a folder'),
        (['eval', str(tmp_path / 'missing.json'), '--ann', str(tmp_path / 'missing.json'), '--out-dir', str(ro / 'e')],
         f'--out-dir {ro / "e"}: cannot create files in {ro}'),
        (['benchmark', '--method', 'single', '--backbone', 'mobilenetv2', '--json', str(ro / 'b.json')],
         f'--json {ro / "b.json"}: cannot create files in {ro}'),
        (['benchmark', '--method', 'single', '--backbone', 'mobilenetv2', '--json', str(tmp_path)],
         f'--json {tmp_path}: {tmp_path} is a folder; give a file name'),
        (['benchmark', '--method', 'single', '--size', '60000x60000'],
         '--size 60000x60000: each side must be at most 8192 pixels'),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err, (argv, err)


def _full_disk(monkeypatch, when):
    """Makes the atomic writers fail as a full disk does (an OSError 28 of the write, naming no file)
    for the files ``when(path)`` selects."""
    import viddet.fileio as fileio
    real = fileio.os.fsync

    def fsync(fd):
        if when(os.readlink(f'/proc/self/fd/{fd}')):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(fileio.os, 'fsync', fsync)


def test_a_full_disk_during_train_and_resume_is_one_line_naming_the_file(tmp_path, monkeypatch):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=3)
    work = tmp_path / 'w'
    train(tiny_config(data), work, max_iters=2, verbose=False, **QUIET)
    with monkeypatch.context() as m:
        _full_disk(m, lambda p: '.epoch_1.pth.' in p)
        with pytest.raises(VidDetError) as e:
            train(tiny_config(data), work, resume=True, verbose=False, **QUIET)
    assert str(e.value) == (f'cannot write {work / "epoch_1.pth"}: No space left on device at iteration 3; kept '
                            f'{work / "iter_2.pth"}: continue with\n  viddet train <tiny> --work-dir {work} --resume')
    assert not list(work.glob('.*.tmp')) and not (work / 'epoch_1.pth').exists()
    with monkeypatch.context() as m:   # the disk still full on --resume: the log cut back cannot be written
        _full_disk(m, lambda p: 'train_log.jsonl' in p)
        with pytest.raises(VidDetError, match=rf'cannot write {work / "train_log.jsonl"}: No space left on device; '
                                              rf'kept {work / "iter_2.pth"}: continue with'):
            train(tiny_config(data), work, resume=True, verbose=False, **QUIET)
    assert train(tiny_config(data), work, resume=True, verbose=False, **QUIET).iters == 6


def test_a_full_disk_while_test_writes_results_is_one_line_saying_what_is_kept(vid, checkpoint, tmp_path, monkeypatch,
                                                                               capsys):
    from viddet.api import VideoDetector
    out = tmp_path / 'o'
    detector = VideoDetector.from_checkpoint(str(checkpoint), device='cpu')
    with monkeypatch.context() as m:
        _full_disk(m, lambda p: 'results.json' in p)
        with pytest.raises(VidDetError) as e:
            run_test(detector, vid['ann_file'], vid['img_prefix'], out, progress=False, max_videos=2)
    assert str(e.value) == (f'cannot write {out / "results.json"}: No space left on device\n  the detections of all 2 '
                            f'video(s) are kept in {out / "videos"}: free space and run the same command with --resume '
                            f'(nothing is run again)')
    with monkeypatch.context() as m:
        _full_disk(m, lambda p: '000001.json' in p)
        with pytest.raises(VidDetError, match=rf'cannot write {tmp_path / "p" / "videos" / "000001.json"}: No space '
                                              rf'left on device\n  1 finished video\(s\) of this run are saved'):
            run_test(detector, vid['ann_file'], vid['img_prefix'], tmp_path / 'p', progress=False, max_videos=2)
    capsys.readouterr()
    run_test(detector, vid['ann_file'], vid['img_prefix'], out, progress=False, max_videos=2, resume=True)
    assert 'resuming the test run in' in capsys.readouterr().out and (out / 'results.json').is_file()


# ---------------------------------------------------------------- 4. quiet wrong answers
def test_a_finetuning_config_with_fewer_classes_says_what_it_drops(tmp_path, capsys):
    data = make_tiny_vid(tmp_path / 'data', num_videos=3, num_frames=2)   # vid0, vid2: car; vid1: dog
    cfg = tiny_config(data)
    raw = cfg.to_dict()
    raw['model']['classes'] = ['airplane', 'car']
    from viddet.config.training import config_from_dict
    capsys.readouterr()
    train(config_from_dict(raw, '<tiny>'), tmp_path / 'w', max_iters=1, **QUIET)
    out = capsys.readouterr().out
    assert (f"<tiny>: data.train.0 ({data['ann_file']}): the file's class(es) dog are not in model.classes: 2 training "
            f"frame(s) annotated only with them are dropped (training on 4 of 6 samples), and their 0 box(es) in the "
            f"frames kept count as background") in out


def test_check_data_reports_one_malformed_file_name_not_every_frame(tmp_path):
    data = make_tiny_vid(tmp_path / 'src', num_videos=2, num_frames=5)
    (tmp_path / 'ILSVRC' / 'Data').mkdir(parents=True)
    (tmp_path / 'src' / 'Data').rename(tmp_path / 'ILSVRC' / 'Data' / 'VID')   # --root ILSVRC finds Data/VID
    ann = json.loads(Path(data['ann_file']).read_text())
    ann['images'][0]['file_name'] = 17
    broken = tmp_path / 'broken.json'
    broken.write_text(json.dumps(ann))
    text = check_data(str(broken), str(tmp_path / 'ILSVRC')).format()
    assert "image id 1 has a file_name that is not a string: '17' (int)" in text
    assert 'not found' not in text


def test_init_checkpoint_folder_and_foreign_backbone_weights_are_named(tmp_path):
    data = make_tiny_vid(tmp_path / 'data', num_videos=1, num_frames=2)
    raw = tiny_config(data).to_dict()
    from viddet.config.training import config_from_dict
    folder = tmp_path / 'ckpts'
    folder.mkdir()
    raw['init'] = {'checkpoint': str(folder)}
    with pytest.raises(VidDetError, match=rf'init.checkpoint: {folder} is a folder, not a file'):
        train(config_from_dict(raw, '<tiny>'), tmp_path / 'w', **QUIET)
    raw['init'] = {'backbone_weights': 'torchvision://resnet50'}
    with pytest.raises(VidDetError, match=r'init.backbone_weights torchvision://resnet50 are the ImageNet weights of '
                                          r'backbone r50 \(R-50\) and do not fit backbone mobilenetv2 \(it has no '
                                          r'published ImageNet weights'):
        train(config_from_dict(raw, '<tiny>'), tmp_path / 'w2', **QUIET)
