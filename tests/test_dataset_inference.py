"""``viddet test`` keeps what it computed: every finished video is saved at once, a run stopped by a
bad frame, Ctrl-C or SIGKILL resumes from its saved videos to exactly the uninterrupted result, a
complete earlier result is never overwritten, and missing frames are found before any work."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_utils import make_tiny_vid
from viddet.api import VideoDetector
from viddet.cli import main
from viddet.engine.evaluate import run_test
from viddet.errors import VidDetError
from viddet.methods import build_method

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_tiny_vid(tmp_path_factory.mktemp('vid'), num_videos=3, num_frames=4, split='val')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ck') / 'single.pth'
    model = build_method('single', 'mobilenetv2')
    with torch.no_grad():
        model.detector.roi_head.bbox_head.fc_cls.weight.mul_(30)   # spread scores: boxes survive
    torch.save({'state_dict': model.state_dict(), 'meta': {'config': {'data': {'scale': [96, 64]}}}}, path)
    return str(path)


def detector(checkpoint):
    return VideoDetector.from_checkpoint(checkpoint, device='cpu')


def test_every_video_is_saved_and_a_complete_result_is_not_overwritten(data, checkpoint, tmp_path):
    out = tmp_path / 'out'
    results = run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], out, progress=False)
    saved = sorted((out / 'videos').glob('*.json'))
    assert [p.name for p in saved] == ['000000.json', '000001.json', '000002.json']
    per_video = [json.loads(p.read_text()) for p in saved]
    assert [v['frames'] for v in per_video] == [4, 4, 4]
    assert sum((v['results'] for v in per_video), []) == results == json.loads((out / 'results.json').read_text())
    assert len(results) > 0
    record = json.loads((out / 'run.json').read_text())
    assert record['method'] == 'single' and record['test']['fast'] is True and record['scale'] == [96, 64]
    from viddet.runtime import cpu_kernels
    assert record['cpu_kernels'] == cpu_kernels().as_dict()    # which CPU kernels the fast paths ran
    before = (out / 'results.json').read_bytes()
    with pytest.raises(VidDetError, match='already holds a complete test run .*another --out-dir .*--resume'):
        run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], out, progress=False)
    assert (out / 'results.json').read_bytes() == before
    # --resume on a finished run runs nothing and gives the same results
    assert run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], out, progress=False,
                    resume=True) == results


def test_a_bad_frame_keeps_the_finished_videos_and_resume_completes_them(data, checkpoint, tmp_path):
    clean = run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], tmp_path / 'clean', progress=False)
    bad = Path(data['img_prefix']) / 'val/vid2/000002.png'
    good = bad.read_bytes()
    bad.write_bytes(b'not a png')
    try:
        with pytest.raises(VidDetError) as e:
            run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], tmp_path / 'run', progress=False)
    finally:
        bad.write_bytes(good)
    msg = str(e.value)
    assert 'vid2' in msg and '000002.png' in msg
    assert '2 finished video(s) of this run are saved' in msg and '--resume' in msg
    assert not (tmp_path / 'run' / 'results.json').exists()
    assert sorted(p.name for p in (tmp_path / 'run' / 'videos').glob('*.json')) == ['000000.json', '000001.json']
    with pytest.raises(VidDetError, match='unfinished test run: continue it with --resume'):
        run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], tmp_path / 'run', progress=False)
    assert run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], tmp_path / 'run', progress=False,
                    resume=True) == clean


def test_resume_with_other_settings_is_refused(data, checkpoint, tmp_path):
    run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], tmp_path / 'r', progress=False, max_videos=1)
    other = VideoDetector.from_checkpoint(checkpoint, device='cpu', fast=False)
    with pytest.raises(VidDetError, match=r'--resume: .* was made with other settings \(test differ'):
        run_test(other, data['ann_file'], data['img_prefix'], tmp_path / 'r', progress=False, max_videos=1,
                 resume=True)


def test_missing_frames_and_bad_arguments_fail_before_any_work(data, checkpoint, tmp_path):
    ann = json.loads(Path(data['ann_file']).read_text())
    ann['images'][-1]['file_name'] = 'val/vid2/000099.png'
    broken = tmp_path / 'broken.json'
    broken.write_text(json.dumps(ann))
    with pytest.raises(VidDetError, match=r'video val/vid2: frame file .*000099.png does not exist \(1 frame file'):
        run_test(detector(checkpoint), str(broken), data['img_prefix'], tmp_path / 'o', progress=False)
    assert not list((tmp_path / 'o' / 'videos').glob('*.json'))       # nothing was run
    with pytest.raises(VidDetError, match='--max-videos must be >= 1, got 0'):
        run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], tmp_path / 'o', max_videos=0)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(VidDetError, match='--out-dir .*file is a file, not a folder'):
        run_test(detector(checkpoint), data['ann_file'], data['img_prefix'], tmp_path / 'file')


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(data, checkpoint, tmp_path):
    """A real process killed with SIGKILL after its first saved video; ``viddet test --resume``
    finishes the run with the same detections and metrics as a run that was never interrupted."""
    clean = tmp_path / 'clean'
    args = ['test', data['ann_file'], '--root', data['img_prefix'], '--checkpoint', checkpoint,
            '--device', 'cpu', '--threads', '1']
    assert main(args + ['--out-dir', str(clean)]) == 0
    out = tmp_path / 'killed'
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / 'src'))
    proc = subprocess.Popen([sys.executable, '-m', 'viddet'] + args + ['--out-dir', str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / 'videos' / '000000.json').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / 'results.json').exists(), 'the run ended before it could be killed'
    assert main(args + ['--out-dir', str(out), '--resume']) == 0
    assert json.loads((out / 'results.json').read_text()) == json.loads((clean / 'results.json').read_text())
    assert json.loads((out / 'metrics.json').read_text()) == json.loads((clean / 'metrics.json').read_text())
