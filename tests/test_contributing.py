"""The walk-throughs of docs/CONTRIBUTING.md work as written.

Adding a method: the example method (a setting, a module with parameters and a fast path) computes
what its docstring says and its fast module equals the plain one; then, in a copy of the package
changed only by the method's file and the table line of ``methods/__init__.py``, it trains for a few
steps with ``viddet train``, its checkpoint reloads *as that method* (by the meta viddet writes),
and ``viddet demo --set test.num_prev=...`` runs it. The example backbone builds a working detector.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import viddet
from viddet.data.image_sources import ArraySource
from viddet.engine.video import run_video

from train_utils import make_tiny_vid, tiny_config

DOC = Path(__file__).resolve().parents[1] / 'docs' / 'CONTRIBUTING.md'
pytestmark = pytest.mark.usefixtures('one_thread')


def example_code(marker: str) -> str:
    """The ```python block of the doc that starts with ``# docs/CONTRIBUTING.md: <marker>``."""
    blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), re.S)
    (code,) = [b for b in blocks if b.startswith(f'# docs/CONTRIBUTING.md: {marker}')]
    return code


def example(marker: str) -> dict:
    """Executes an example block of the doc; returns its namespace."""
    namespace: dict = {}
    exec(compile(example_code(marker), f'{DOC}:{marker}', 'exec'), namespace)  # noqa: S102 - our own docs
    return namespace


def table_lines() -> list:
    """The lines the doc says to put into methods/__init__.py (its plain ``` block after the method)."""
    text = DOC.read_text()
    block = re.search(r'import it and add it to the table:\n\n```\n(.*?)```', text, re.S).group(1)
    return block.strip().splitlines()


def test_example_method_blends_and_its_fast_module_equals_the_plain_one():
    from viddet import speedups
    ns = example('example method')
    PrevBlend, Blend, FastBlend = ns['PrevBlend'], ns['Blend'], ns['FastBlend']
    torch.manual_seed(0)
    model = PrevBlend.build('mobilenetv2', num_classes=3, num_prev=2).eval()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(4)]
    seen = []
    detect = model.detector.detect
    model.detector.detect = lambda feats, meta, timer: seen.append(feats.clone()) or detect(feats, meta, timer)
    plain = list(run_video(model, ArraySource(frames), scale=(64, 48)))
    assert [r.frame.index for r in plain] == [0, 1, 2, 3]
    # frame 3 = blend of its features with the mean of frames 1 and 2 (num_prev = 2), by hand
    with torch.no_grad():
        f = [model.detector.extract_feat(r.frame.img) for r in plain]
        w = torch.sigmoid(model.blend.gate(torch.cat([f[3], (f[1] + f[2]) / 2], dim=1)))
        torch.testing.assert_close(seen[3], w * f[3] + (1 - w) * (f[1] + f[2]) / 2)
        torch.testing.assert_close(seen[0], f[0])
    # the fast path: swapped in by the method's fast_modules, same parameters, same detections
    del model.detector.detect
    speedups.convert(model)
    assert type(model.blend) is FastBlend and model.blend.gate.weight is not None
    assert set(model.state_dict()) == set(PrevBlend.build('mobilenetv2', num_classes=3).state_dict())
    fast = list(run_video(model, ArraySource(frames), scale=(64, 48)))
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b.detections.boxes, a.detections.boxes, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.detections.scores, a.detections.scores, atol=1e-5, rtol=1e-4)
    speedups.revert(model)
    assert type(model.blend) is Blend
    with pytest.raises(ValueError, match='num_prev must be >= 1, got 0'):
        PrevBlend.Settings(num_prev=0)


def test_adding_a_method_is_its_file_and_the_table_line(tmp_path):
    """Copy the package, add only what the doc says, and use the method through the real CLI in a
    fresh process: train, reload the checkpoint as that method, run the demo with --set."""
    pkg = tmp_path / 'pkg'
    shutil.copytree(Path(viddet.__file__).parent, pkg / 'viddet', ignore=shutil.ignore_patterns('__pycache__'))
    (pkg / 'viddet' / 'methods' / 'prevblend.py').write_text(example_code('example method'))
    table = pkg / 'viddet' / 'methods' / '__init__.py'
    imports, new_table = table_lines()
    text = table.read_text()
    old_table = re.search(r'^METHODS[^\n]*$', text, re.M).group(0)
    text = text.replace(old_table, new_table)
    text = text.replace('from viddet.methods.troi import TRoI\n', f'from viddet.methods.troi import TRoI\n{imports}\n')
    table.write_text(text)
    assert 'PrevBlend' in text and text.count('PrevBlend') == 2

    data = tmp_path / 'data'
    paths = make_tiny_vid(data, num_videos=1, num_frames=4)
    cfg = tiny_config(paths, 'single', epochs=1).to_dict()
    cfg['model'].update(method='prevblend', test={'num_prev': 2})
    cfg['data']['train'][0]['ref_sampler'] = {'num_ref_imgs': 1, 'frame_range': 2, 'filter_key_img': True,
                                              'method': 'uniform'}
    (tmp_path / 'prevblend.yaml').write_text(yaml.safe_dump(cfg))
    script = f'''
import json, sys
from pathlib import Path
from viddet.cli import main
from viddet.checkpoints.loading import load_model
tmp = Path({str(tmp_path)!r})
rc = main(['train', str(tmp / 'prevblend.yaml'), '--work-dir', str(tmp / 'work'), '--no-eval', '--no-progress',
           '--threads', '1', '--max-iters', '3'])
assert rc == 0, rc
ckpt = sorted((tmp / 'work').glob('*.pth'))[-1]
loaded = load_model(str(ckpt))
print(json.dumps({{'name': loaded.model.name, 'num_prev': loaded.model.num_prev,
                   'blend': type(loaded.model.blend).__name__, 'test': loaded.test.values()}}))
rc = main(['demo', str(tmp / 'data' / 'Data' / 'train' / 'vid0'), '--checkpoint', str(ckpt), '--set',
           'test.num_prev=3', '--out', str(tmp / 'demo.mp4'), '--threads', '1'])
assert rc == 0, rc
rc = main(['demo', str(tmp / 'data' / 'Data' / 'train' / 'vid0'), '--checkpoint', str(ckpt), '--set',
           'test.num_prev=0', '--out', str(tmp / 'demo2.mp4'), '--threads', '1'])
assert rc == 2, rc
'''
    env = dict(os.environ, PYTHONPATH=str(pkg) + os.pathsep + str(Path(__file__).parent))
    run = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert 'test.num_prev must be >= 1, got 0' in run.stderr
    info = json.loads([line for line in run.stdout.splitlines() if line.startswith('{')][-1])
    assert info == {'name': 'prevblend', 'num_prev': 2, 'blend': 'FastBlend', 'test': {'fast': True, 'num_prev': 2}}
    records = [json.loads(line) for line in (tmp_path / 'demo.jsonl').read_text().splitlines()]
    assert [r['frame'] for r in records] == [0, 1, 2, 3]
    # the unchanged package knows nothing of it: the copy was the only place touched
    from viddet.methods import METHOD_NAMES
    assert 'prevblend' not in METHOD_NAMES


def test_example_backbone_builds_a_detector():
    from viddet.models.detector import FasterRCNN, build_faster_rcnn
    r152 = example('example backbone')['r152']
    assert (r152.name, r152.title) == ('r152', 'R-152')
    body = r152.build()
    assert body.out_channels == 2048 and len(body.layer3) == 36
    det = build_faster_rcnn('r50')
    det = FasterRCNN(body, det.neck, det.rpn_head, det.roi_head).eval()
    with torch.no_grad():
        assert det.extract_feat(torch.randn(1, 3, 64, 96)).shape == (1, 512, 4, 6)
