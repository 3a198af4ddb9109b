"""ONNX export (``viddet export``, :mod:`viddet.export`): every method's stages as ONNX graphs, run by
ONNX Runtime through the same engine.

* Tiny round trip (MobileNetV2 backbone, random weights): each graph computes what its plain module
  computes (checked at another frame size than the one it was traced at, so dynamic sizes are real),
  and the exported method gives the PyTorch path's detections on a few frames, offline and online.
* A corrupt / truncated / mismatched export folder is one ``VidDetError`` line (CLI: no traceback).
* ``slow``: each shared parity checkpoint (R-50) exported, run from the folder, compared with
  MMTracking's detections in ``../shared/parity/ref_*.json`` by the rule of ``tests/test_parity.py``.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('onnxruntime', reason='the export tests need the export extra: pip install -e ".[export]"')
pytest.importorskip('onnx', reason='the export tests need the export extra: pip install -e ".[export]"')

from viddet import speedups  # noqa: E402
from viddet.checkpoints.loading import load_model  # noqa: E402
from viddet.cli import main  # noqa: E402
from viddet.data.image_sources import ArraySource, FolderSource  # noqa: E402
from viddet.engine.video import run_video  # noqa: E402
from viddet.errors import VidDetError  # noqa: E402
from viddet.export import export_model, load_export  # noqa: E402
from viddet.export.stages import FastOrtRPNHead, OrtModule, OrtRPNHead, OrtStage  # noqa: E402
from viddet.methods import METHODS, method_class  # noqa: E402
from viddet.methods.faster_rcnn import FasterRCNNMethod  # noqa: E402
from viddet.models.aggregators import SelsaAggregator  # noqa: E402
from viddet.speedups.detector import FastRoIHead, FastSingleRoIExtractor  # noqa: E402
from viddet.speedups.troi import FastTemporalRoIAlign  # noqa: E402

FASTER_RCNN = [m.name for m in METHODS if issubclass(m, FasterRCNNMethod)]   # what export supports

sys.path.insert(0, str(Path(__file__).parent))
from test_parity import CASES, match_detections  # noqa: E402

CLASSES = ('cat', 'dog', 'fox')
SCALE = (200, 120)
SETTINGS = {'single': {}, 'dff': {'key_frame_interval': 3}, 'fgfa': {'num_left': 2, 'num_right': 2},
            'selsa': {'num_refs': 3}, 'troi': {'num_refs': 3}}


def informative(model):
    """Random weights that keep the signal (He-scaled matrices, gains near 1), so that scores and
    boxes depend on the image and differ between proposals (mmdet's init gives a tiny random
    MobileNet near-constant features, hence tied scores that float rounding orders)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith('weight') else 0.0))
        # a positive neck bias: no all-zero feature vector (Temporal RoI Align's normalisation has no
        # epsilon, as MMTracking's: a zero vector would make NaN scores)
        model.detector.neck.convs[0].conv.bias.abs_().add_(0.1)
        model.detector.roi_head.bbox_head.fc_cls.weight[-1].zero_()   # background logit 0: objects score
        for m in model.modules():   # SELSA: softer attention, so that rounding is not amplified
            if isinstance(m, SelsaAggregator):
                m.fc_embed.weight.mul_(0.1)
                m.ref_fc_embed.weight.mul_(0.1)
    return model


def frames(n=4, seed=1):
    """n frames (120 x 200, BGR uint8): a noise image shifted 3 px per frame."""
    base = (torch.rand(120, 200, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte()
    return [base.roll(3 * i, 1).numpy().copy() for i in range(n)]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """``get(method)``: (the tiny PyTorch model, its export folder), made once per module."""
    made = {}

    def get(method):
        if method not in made:
            torch.manual_seed(0)
            model = informative(method_class(method).build('mobilenetv2', len(CLASSES), **SETTINGS[method])).eval()
            out = tmp_path_factory.mktemp(f'export_{method}')
            export_model(model, out, CLASSES, SCALE, model.Settings(**SETTINGS[method]))
            made[method] = (model, out)
        return made[method]
    return get


# The tiny model's random weights make boxes a fraction of a pixel thin and logits large, so float
# rounding (ONNX Runtime's MLAS vs PyTorch's oneDNN, ~1e-4 relative on the features) moves a score by
# up to 2e-3 and a thin box's IoU below 0.99: the tiny comparison allows IoU 0.9 and scores 5e-3
# (a wrong graph reproduces under 40%); the parity test below applies the strict rule.
def detections_as_reference(result):
    d = result.detections
    return [{'label': int(l), 'bbox': b.tolist(), 'score': float(s)} for b, s, l in zip(d.boxes, d.scores, d.labels)]


@pytest.mark.parametrize('method', FASTER_RCNN)
def test_export_round_trip_gives_the_pytorch_detections(method, exported, one_thread):
    model, folder = exported(method)
    manifest = json.loads((folder / 'model.json').read_text())
    assert manifest['method'] == method and manifest['classes'] == list(CLASSES)
    assert manifest['backbone'] == 'mobilenetv2' and manifest['preprocessing']['scale'] == list(SCALE)
    loaded = load_model(str(folder))
    ort = loaded.model
    assert type(ort) is type(model) and loaded.class_names == CLASSES and loaded.scale == SCALE
    assert loaded.test == model.Settings(**SETTINGS[method])   # fast: the weight-free steps' fast modules
    assert not list(ort.parameters()), 'every weight runs in ONNX Runtime'
    assert any(isinstance(m, OrtModule) for m in ort.modules()) and any(isinstance(m, OrtStage) for m in ort.modules())
    plain = speedups.revert(model)
    clip = frames(3)
    # online differs from offline for the methods that read ahead or spread references over the video
    for mode in ('offline', 'online') if method in ('fgfa', 'selsa', 'troi') else ('offline',):
        ours = list(run_video(ort, ArraySource(clip), mode=mode, scale=SCALE))
        theirs = list(run_video(plain, ArraySource(clip), mode=mode, scale=SCALE))
        total = reproduced = 0
        for a, b in zip(theirs, ours):
            ref = detections_as_reference(a)
            total += len(ref)
            reproduced += match_detections(ref, b.detections.boxes, b.detections.scores, b.detections.labels,
                                           iou_thr=0.9, score_tol=5e-3)
        assert total >= 150, f'{method} {mode}: too few detections to compare ({total})'
        # Temporal RoI Align's top-2 most-similar search meets near-ties that rounding decides
        # (tests/test_parity.py): a lower bar, as in the parity test
        bar = 0.95 if method == 'troi' else 0.97
        assert reproduced >= bar * total, f'{method} {mode}: {reproduced}/{total} PyTorch detections reproduced'


@pytest.mark.parametrize('method', ['dff', 'selsa'])
def test_each_graph_computes_its_plain_module_at_another_size(method, exported, one_thread):
    """Traced at 144 x 144, run at 128 x 208 (features 8 x 13): the same values as the plain modules."""
    model, folder = exported(method)
    ort = load_export(folder).model
    images = torch.randn(2, 3, 128, 208, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = model.detector.extract_feat(images)
        torch.testing.assert_close(ort.detector.extract_feat(images), feats, rtol=1e-3, atol=1e-3)
        for a, b in zip(ort.detector.rpn_head(feats), model.detector.rpn_head(feats)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        rois = torch.tensor([[0, 10., 20, 90, 100], [1, 0, 0, 207, 127], [0, 50, 5, 60, 40]])
        roi_feats = model.detector.roi_head.roi_align(feats, rois)
        if method == 'dff':
            pairs = model.motion.prepare_inputs(images[:1], images, (120, 200))
            torch.testing.assert_close(ort.motion.forward_prepared(pairs), model.motion.forward_prepared(pairs),
                                       rtol=1e-3, atol=1e-3)
            for a, b in zip(ort.detector.roi_head.bbox_head(roi_feats), model.detector.roi_head.bbox_head(roi_feats)):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        else:
            refs = model.detector.roi_head.roi_align(feats, torch.cat([rois, rois + torch.tensor([0, 4., 4, 4, 4])]))
            got = ort.detector.roi_head.bbox_head(roi_feats, refs)
            for a, b in zip(got, model.detector.roi_head.bbox_head(roi_feats, refs)):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('method', ['single', 'troi'])
def test_an_export_runs_the_fast_weight_free_steps(method, exported, one_thread):
    """As on the PyTorch path, ``test.fast`` (the default) swaps in the fast modules of the steps
    that stay in PyTorch (NMS, RoIAlign, Temporal RoI Align's most-similar search); they compute
    what the export's plain modules (``fast=False``) compute, and ``revert`` gives those back."""
    model, folder = exported(method)
    fast, plain = load_export(folder).model, load_export(folder, fast=False).model
    assert type(fast.detector.rpn_head) is FastOrtRPNHead and type(fast.detector.roi_head) is FastRoIHead
    assert isinstance(fast.detector.roi_head.bbox_roi_extractor, FastSingleRoIExtractor)
    assert not speedups.is_converted(plain) and not list(fast.parameters())
    reverted = speedups.revert(load_export(folder).model)
    assert type(reverted.detector.rpn_head) is OrtRPNHead and not speedups.is_converted(reverted)
    clip = frames(3)
    total = reproduced = 0
    for a, b in zip(run_video(plain, ArraySource(clip), scale=SCALE), run_video(fast, ArraySource(clip), scale=SCALE)):
        ref = detections_as_reference(a)
        total += len(ref)
        reproduced += match_detections(ref, b.detections.boxes, b.detections.scores, b.detections.labels)
    assert total >= 150 and reproduced >= (0.98 if method == 'troi' else 1.0) * total, f'{reproduced}/{total}'
    if method == 'troi':   # the export's Temporal RoI Align: fast search, the embedding graph on the maps
        troi = fast.detector.roi_head.bbox_roi_extractor
        assert type(troi) is FastTemporalRoIAlign and not troi.reassociated()
        g = torch.Generator().manual_seed(5)
        feats, refs = torch.randn(1, 512, 9, 14, generator=g), torch.randn(3, 512, 9, 14, generator=g)
        rois = torch.tensor([[0, 10., 20, 90, 100], [0, 0, 0, 207, 127], [0, 50, 5, 60, 40]])
        expected = speedups.revert(model).detector.roi_head.bbox_roi_extractor(feats, rois, refs)
        with torch.no_grad():
            torch.testing.assert_close(troi(feats, rois, refs), expected, rtol=1e-3, atol=1e-3)


def test_api_and_demo_run_an_export_folder(exported, tmp_path, one_thread):
    from viddet.api import VideoDetector
    model, folder = exported('dff')
    detector = VideoDetector.from_checkpoint(str(folder), device='cpu')
    assert detector.method == 'dff' and detector.class_names == CLASSES
    clip_dir = tmp_path / 'clip'
    clip_dir.mkdir()
    import cv2
    for i, f in enumerate(frames(3)):
        cv2.imwrite(str(clip_dir / f'{i:06d}.png'), f)
    out = tmp_path / 'demo.mp4'
    assert main(['demo', str(clip_dir), '--checkpoint', str(folder), '--out', str(out), '--link', 'seqnms']) == 0
    lines = [json.loads(x) for x in out.with_suffix('.jsonl').read_text().splitlines()]
    assert len(lines) == 3 and all(len(x['boxes']) > 0 and 'track_ids' in x for x in lines)
    assert set(lines[0]['names']) <= set(CLASSES)


# ------------------------------------------------------------------ broken folders: one line each
def _copy(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / 'copy'))


def _error(path, **kwargs) -> str:
    with pytest.raises(VidDetError) as e:
        load_model(str(path), **kwargs)
    message = str(e.value)
    assert '\n' not in message and 'Traceback' not in message
    return message


def test_broken_export_folders_are_one_line_errors(exported, tmp_path, capsys):
    _, folder = exported('single')
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert 'no model.json: not a viddet ONNX export' in _error(empty)
    assert 'holds a single export, not dff' in _error(folder, method='dff')
    assert 'holds a mobilenetv2 export, not r50' in _error(folder, backbone='r50')

    broken = _copy(folder, tmp_path)
    (broken / 'model.json').write_text('{"format": "viddet-onnx", "vers')
    assert 'model.json: not a readable manifest' in _error(broken)

    shutil.rmtree(broken)
    broken = _copy(folder, tmp_path)
    graph = broken / 'box_head.onnx'
    graph.write_bytes(graph.read_bytes()[:1000])   # truncated
    assert 'box_head.onnx: SHA-256 differs from model.json' in _error(broken)
    graph.unlink()
    assert 'box_head.onnx: graph missing' in _error(broken)

    # a graph of another stage under the name the manifest gives, hashes updated: mismatched inputs
    shutil.copy(broken / 'rpn.onnx', graph)
    manifest = json.loads((broken / 'model.json').read_text())
    import hashlib
    for s in manifest['stages']:
        for g in s['graphs']:
            g['sha256'] = hashlib.sha256((broken / g['file']).read_bytes()).hexdigest()
    (broken / 'model.json').write_text(json.dumps(manifest))
    assert "box_head.onnx: graph inputs ['feats'] differ from the manifest's ['roi_feats']" in _error(broken)

    # class names that do not fit the box head's scores; a resize scale that is not two sizes
    shutil.copy(folder / 'box_head.onnx', graph)
    manifest = json.loads((folder / 'model.json').read_text())
    (broken / 'model.json').write_text(json.dumps({**manifest, 'classes': list(CLASSES) + ['owl']}))
    assert 'box_head.onnx: scores 4 classes (with background), but model.json lists 4 classes' in _error(broken)
    (broken / 'model.json').write_text(json.dumps({**manifest, 'preprocessing': {'scale': 'big'}}))
    assert "preprocessing.scale must be [long side, short side] in pixels, got 'big'" in _error(broken)

    # a stage missing from the manifest: the method has weights no graph holds
    shutil.copy(folder / 'box_head.onnx', graph)
    manifest = json.loads((folder / 'model.json').read_text())
    manifest['stages'] = [s for s in manifest['stages'] if s['kind'] != 'rpn']
    (broken / 'model.json').write_text(json.dumps(manifest))
    assert 'no stage of the export holds detector.rpn_head.' in _error(broken)

    # the CLI prints it as one line, exit status 2
    assert main(['demo', str(tmp_path / 'x.mp4'), '--checkpoint', str(broken), '--out', str(tmp_path / 'o.mp4')]) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.count('\n') == 1, err


def test_a_module_without_a_stage_cannot_be_exported(tmp_path):
    model = method_class('single').build('mobilenetv2', 3)
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(VidDetError, match=r'cannot export SingleFrame: no ONNX stage holds its weights extra.weight'):
        export_model(model, tmp_path / 'x', CLASSES)
    with pytest.raises(VidDetError, match=r'--opset 9: the exporter writes opsets 13 to 20'):
        export_model(model, tmp_path / 'x', CLASSES, opset=9)


# ------------------------------------------------------------------ parity with MMTracking (R-50)
# method -> leading frames compared (the run still covers the clip's whole window logic); kept short for CI:
# on more frames, measured once (fast modules on, 1 thread): single 300/300 (3 frames), DFF 1200/1200 (12),
# FGFA and SELSA 300/300 (3), TRoI 297/300 (3) and 597/600 (6)
PARITY_FRAMES = {'single': 2, 'dff': 2, 'fgfa': 2, 'selsa': 2, 'troi': 3}   # DFF: a key frame and a warped one


@pytest.fixture(scope='module')
def parity_dir():
    d = Path(__file__).resolve().parents[2] / 'shared' / 'parity'
    if not d.exists():
        pytest.skip(f'{d} is absent: parity tests need the shared parity fixtures beside the repository')
    return d


@pytest.fixture(scope='module')
def parity_export(parity_dir, parity_checkpoint, tmp_path_factory):
    """``get(method)``: the folder ``viddet export`` makes of the shared parity checkpoint, once per module."""
    made = {}

    def get(method):
        if method not in made:
            checkpoint = parity_checkpoint(f'{CASES[method][0]}.txt', 0, parity_dir)
            folder = tmp_path_factory.mktemp(f'{method}_onnx')
            assert main(['export', str(checkpoint), '--out', str(folder), '--method', method]) == 0
            made[method] = folder
        return made[method]
    return get


def _reproduced(expected_frames, got) -> tuple:
    """(reproduced, total) reference detections over frames; ``got``: (file name, boxes, scores, labels)."""
    total = reproduced = 0
    for expected, (name, boxes, scores, labels) in zip(expected_frames, got):
        assert name == expected['file_name']
        total += len(expected['detections'])
        reproduced += match_detections(expected['detections'], boxes, scores, labels)
    return reproduced, total


@pytest.mark.slow
@pytest.mark.parametrize('method', list(CASES))
def test_exported_parity_checkpoint_reproduces_mmtracking(method, parity_dir, parity_export):
    _, _, bar = CASES[method]
    num_frames = PARITY_FRAMES[method]
    ref = json.loads((parity_dir / f'ref_{method}_vid7010_first12_seed0.json').read_text())
    loaded = load_model(str(parity_export(method)))
    assert not list(loaded.model.parameters()) and speedups.is_converted(loaded.model)   # the fast weight-free steps
    source = FolderSource(str(parity_dir / 'clips' / ref['clip']))
    results = run_video(loaded.model, source, mode='offline', scale=loaded.scale)
    got = [(r.frame.name, r.detections.boxes, r.detections.scores, r.detections.labels)
           for _, r in zip(range(num_frames), results)]   # range first: no frame past the last is run
    results.close()
    source.close()
    reproduced, total = _reproduced(ref['frames'][:num_frames], got)
    print(f'{method} (ONNX Runtime): {reproduced}/{total} reference detections reproduced')
    assert total >= 100 * min(num_frames, 2)
    assert reproduced >= bar * total, f'{method}: {reproduced}/{total} reference detections reproduced'


@pytest.mark.slow
@pytest.mark.parametrize('method', ['single', 'dff'])
def test_viddet_demo_of_an_export_reproduces_mmtracking(method, parity_dir, parity_export, tmp_path):
    """``viddet demo CLIP --checkpoint DIR``, its JSON lines (boxes to 0.01 px, scores to 1e-4) against
    MMTracking's detections. ``--max-frames`` cuts the video, which changes nothing for these two
    methods (no look-ahead, no references); the window methods run the whole clip above."""
    ref = json.loads((parity_dir / f'ref_{method}_vid7010_first12_seed0.json').read_text())
    out = tmp_path / 'demo.mp4'
    assert main(['demo', str(parity_dir / 'clips' / ref['clip']), '--checkpoint', str(parity_export(method)),
                 '--out', str(out), '--max-frames', '2', '--device', 'cpu']) == 0
    lines = [json.loads(x) for x in out.with_suffix('.jsonl').read_text().splitlines()]
    assert len(lines) == 2
    got = [(x['file'], torch.tensor(x['boxes']).view(-1, 4), torch.tensor(x['scores']), torch.tensor(x['labels']))
           for x in lines]
    reproduced, total = _reproduced(ref['frames'][:2], got)
    assert total >= 200 and reproduced >= CASES[method][2] * total, f'{method}: {reproduced}/{total}'
