"""Checkpoint resolution, verified downloads from a local HTTP server, reading, strict loading with
helpful errors, plain mmdet files and class names (viddet.checkpoints, VideoDetector.from_checkpoint)."""
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from viddet import VID_CLASSES, VidDetError
from viddet.checkpoints.download import cache_dir, resolve_checkpoint
from viddet.checkpoints.loading import load_into
from viddet.checkpoints.reading import class_names, read_checkpoint
from viddet.checkpoints.zoo import MODEL_ZOO, YOLOV_ZOO, zoo_url
from viddet.methods import METHODS, build_method
from conftest import read_keys


pytestmark = pytest.mark.usefixtures('one_thread')




def meta_state(path: Path):
    """A state dict of shape-only tensors with the names and shapes of a key list."""
    return {k: torch.empty(s, device='meta') for k, s in read_keys(path).items()}




def publish(server, monkeypatch, name, payload: bytes, prefix=None):
    """Serves ``payload`` as vid/test/<name>-<prefix>.pth and registers zoo name ``name``."""
    prefix = prefix or hashlib.sha256(payload).hexdigest()[:8]
    rel = f'vid/test/{name}-{prefix}.pth'
    (server.root / 'vid' / 'test').mkdir(parents=True, exist_ok=True)
    (server.root / rel).write_bytes(payload)
    monkeypatch.setitem(MODEL_ZOO, name, rel)
    monkeypatch.setenv('VIDDET_ZOO_BASE', server.base)
    return rel


def tiny_checkpoint_bytes(tmp_path) -> bytes:
    p = tmp_path / 'tiny.pth'
    torch.save({'state_dict': {'w': torch.arange(6.0)}, 'meta': {'CLASSES': ('a', 'b')}}, p)
    return p.read_bytes()


def test_zoo_download_once_into_cache(tmp_path, server, home, monkeypatch):
    payload = tiny_checkpoint_bytes(tmp_path)
    rel = publish(server, monkeypatch, 'tiny_test', payload)
    assert zoo_url('tiny_test') == server.base + rel
    assert cache_dir() == home / 'checkpoints'
    path = resolve_checkpoint('tiny_test', progress=False)
    assert path == home / 'checkpoints' / Path(rel).name
    assert path.read_bytes() == payload
    assert server.hits == ['/' + rel]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temporary file left
    # the second resolve uses the cache: the server is not asked again
    assert resolve_checkpoint('tiny_test', progress=False) == path
    assert server.hits == ['/' + rel]
    state, meta = read_checkpoint(path)
    assert torch.equal(state['w'], torch.arange(6.0)) and class_names(meta) == ('a', 'b')
    # a URL is cached under its file name the same way
    url = server.base + rel
    assert resolve_checkpoint(url, progress=False) == path
    assert len(server.hits) == 1


def test_download_hash_mismatch_leaves_nothing(tmp_path, server, home, monkeypatch):
    payload = tiny_checkpoint_bytes(tmp_path)
    wrong = 'deadbeef' if not hashlib.sha256(payload).hexdigest().startswith('deadbeef') else 'beefdead'
    publish(server, monkeypatch, 'tiny_bad', payload, prefix=wrong)
    with pytest.raises(VidDetError, match=f'SHA-256 .* does not start with {wrong}') as e:
        resolve_checkpoint('tiny_bad', progress=False)
    assert 'corrupt or not the published one' in str(e.value)
    assert len(server.hits) == 1
    folder = home / 'checkpoints'
    assert not folder.exists() or list(folder.iterdir()) == []
    # and the next attempt downloads again instead of trusting a leftover
    with pytest.raises(VidDetError):
        resolve_checkpoint('tiny_bad', progress=False)
    assert len(server.hits) == 2


def test_unreachable_server_says_where_to_put_the_file(home, monkeypatch):
    with socket.socket() as s:      # a port on which nothing listens
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setenv('VIDDET_ZOO_BASE', f'http://127.0.0.1:{port}')
    dest = home / 'checkpoints' / MODEL_ZOO['dff_r50'].split('/')[-1]
    with pytest.raises(VidDetError) as e:
        resolve_checkpoint('dff_r50', progress=False)
    msg = str(e.value)
    assert f'could not download http://127.0.0.1:{port}/vid/dff/' in msg
    assert f'download it elsewhere and put it at {dest}' in msg
    assert '--checkpoint' in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []


class _ShortHandler(http.server.BaseHTTPRequestHandler):
    """Announces 100000 bytes, sends 1000 and closes the connection (a dropped download)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', '100000')
        self.end_headers()
        self.wfile.write(b'x' * 1000)
        self.wfile.flush()
        self.close_connection = True


def test_dropped_connection_is_not_cached_as_complete(home):
    """A URL without a hash in its name: only the Content-Length can tell the download is short."""
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _ShortHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{httpd.server_address[1]}/models/plain.pth'
        with pytest.raises(VidDetError, match=r'stopped after 1000 of 100000 bytes.*put it at .*plain\.pth'):
            resolve_checkpoint(url, progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    assert list((home / 'checkpoints').iterdir()) == []


def test_missing_file_on_server(server, home, monkeypatch):
    monkeypatch.setitem(MODEL_ZOO, 'tiny_gone', 'vid/test/gone-0123abcd.pth')
    monkeypatch.setenv('VIDDET_ZOO_BASE', server.base)
    with pytest.raises(VidDetError, match='could not download .*gone-0123abcd.pth'):
        resolve_checkpoint('tiny_gone', progress=False)
    assert list((home / 'checkpoints').iterdir()) == []


def test_unknown_name_and_missing_file(tmp_path, home):
    with pytest.raises(VidDetError, match="'selsa_r18' is neither a checkpoint file, a URL nor a model-zoo name") as e:
        resolve_checkpoint('selsa_r18')
    assert 'selsa_r50' in str(e.value)   # lists the known names
    missing = tmp_path / 'nowhere' / 'model.pth'
    with pytest.raises(VidDetError, match=f'checkpoint file {missing} does not exist'):
        resolve_checkpoint(str(missing))
    existing = tmp_path / 'local.pth'
    existing.write_bytes(b'x')
    assert resolve_checkpoint(str(existing)) == existing   # a local file is used as is
    assert not (home / 'checkpoints').exists()


def test_zoo_table_is_consistent():
    for name, rel in MODEL_ZOO.items():
        assert rel.endswith('.pth') and '-' in rel.rsplit('_', 1)[-1], name
        assert len(rel.rsplit('-', 1)[-1]) == len('548911a4.pth')
    assert {m.default_checkpoint for m in METHODS} - {None} <= set(MODEL_ZOO) | set(YOLOV_ZOO)
    assert MODEL_ZOO['dff_r50'] == ('vid/dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid/'
                                    'dff_faster_rcnn_r50_dc5_1x_imagenetvid_20201227_213250-548911a4.pth')


# ------------------------------------------------------------------------------------ reading
def test_non_checkpoint_files_give_clear_errors(tmp_path):
    text = tmp_path / 'notes.pth'
    text.write_text('this is not a checkpoint\n')
    with pytest.raises(VidDetError, match=f'{text} is not a readable PyTorch checkpoint'):
        read_checkpoint(text)
    lst = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(VidDetError, match=f'{lst} holds a list, not a checkpoint dict'):
        read_checkpoint(lst)
    empty = tmp_path / 'empty.pth'
    torch.save({'meta': {'CLASSES': ('a',)}, 'epoch': 3}, empty)
    with pytest.raises(VidDetError, match=f'{empty} contains no model weights'):
        read_checkpoint(empty)
    from viddet.api import VideoDetector
    with pytest.raises(VidDetError, match='is not a readable PyTorch checkpoint'):
        VideoDetector.from_checkpoint(str(text), device='cpu')


def test_reads_mmtracking_style_legacy_file(tmp_path):
    """MMTracking's published files: old (non-zip) serialisation, ``state_dict`` + ``meta``."""
    path = tmp_path / 'legacy.pth'
    meta = {'CLASSES': VID_CLASSES, 'mmtrack_version': '0.5.0', 'time': 'Sun Dec 27 21:32:50 2020',
            'config': "model = dict(type='DFF')", 'epoch': 7, 'iter': 27475}
    torch.save({'state_dict': {'detector.w': torch.ones(2, 3)}, 'meta': meta}, path,
               _use_new_zipfile_serialization=False)
    state, got_meta = read_checkpoint(path)
    assert list(state) == ['detector.w'] and torch.equal(state['detector.w'], torch.ones(2, 3))
    assert class_names(got_meta) == VID_CLASSES and got_meta['epoch'] == 7
    # a bare state dict (no 'state_dict' entry) is read too, with empty meta
    torch.save({'w': torch.zeros(1)}, path)
    state, got_meta = read_checkpoint(path)
    assert list(state) == ['w'] and got_meta == {}


def test_class_names_from_meta():
    names = tuple(f'c{i}' for i in range(3))
    assert class_names({'CLASSES': names}) == names                         # MMTracking 0.x
    assert class_names({'dataset_meta': {'classes': list(names)}}) == names  # MMTracking 1.x
    assert class_names({'classes': names}) == names
    assert class_names({}) == VID_CLASSES
    assert class_names({'CLASSES': None, 'dataset_meta': {}}) == VID_CLASSES
    assert len(VID_CLASSES) == 30 and VID_CLASSES[0] == 'airplane' and VID_CLASSES[-1] == 'zebra'


# ------------------------------------------------------------------------------------ strict loading
def test_load_into_with_another_methods_checkpoint(shared):
    state = meta_state(shared('parity', 'keys', 'dff_r50.txt'))
    with torch.device('meta'):
        model = build_method('selsa', 'r50')
    with pytest.raises(VidDetError) as e:
        load_into(model, state, 'dff.pth')
    msg = str(e.value)
    assert msg.startswith('dff.pth does not fit this model; it looks like a DFF R-50 checkpoint.')
    assert '16 missing keys: detector.roi_head.bbox_head.aggregator.0.' in msg
    assert '33 unexpected keys: motion.conv1.0.conv.weight, motion.conv1.0.conv.bias' in msg
    assert '(+11 more)' in msg and '(+28 more)' in msg


def test_load_into_shape_mismatch_names_the_file_kind(shared):
    state = meta_state(shared('parity', 'keys', 'selsa_r101.txt'))
    with torch.device('meta'):
        model = build_method('selsa', 'x101')
    with pytest.raises(VidDetError) as e:
        load_into(model, state, 'r101.pth')
    msg = str(e.value)
    assert 'it looks like a SELSA R-101 checkpoint' in msg
    assert 'missing keys' not in msg and 'unexpected keys' not in msg
    assert 'shape mismatches: detector.backbone.layer1.0.conv1.weight (file (64, 64, 1, 1), model (256, 64, 1, 1))' in msg


def test_load_into_real_weights_round_trip():
    torch.manual_seed(0)
    src = build_method('selsa', 'r50')
    torch.manual_seed(1)
    dst = build_method('selsa', 'r50')
    load_into(dst, src.state_dict(), 'x')
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    # ignore_prefixes drops keys the model does not have (the single model from a SELSA file)
    single = build_method('single', 'r50')
    with pytest.raises(VidDetError, match='unexpected keys: detector.roi_head.bbox_head.aggregator'):
        load_into(single, src.state_dict(), 'selsa.pth')
    load_into(single, src.state_dict(), 'selsa.pth', ignore_prefixes=('detector.roi_head.bbox_head.aggregator.',))
    assert torch.equal(single.detector.backbone.conv1.weight, src.detector.backbone.conv1.weight)


def test_plain_mmdet_faster_rcnn_file_loads_into_single(tmp_path):
    """A plain mmdet Faster R-CNN file (keys ``backbone.*``, ``rpn_head.*``... without the
    ``detector.`` prefix), MMTracking 1.x class names in its meta."""
    from viddet.api import VideoDetector
    torch.manual_seed(3)
    det = build_method('single', 'r50').detector
    names = [f'thing{i}' for i in range(30)]
    path = tmp_path / 'faster_rcnn_r50_dc5.pth'
    torch.save({'state_dict': det.state_dict(), 'meta': {'dataset_meta': {'classes': names}}}, path)
    del det
    loaded = VideoDetector.from_checkpoint(str(path), device='cpu')
    assert loaded.method == 'single' and loaded.class_names == tuple(names)
    assert not loaded.model.training
    state, _ = read_checkpoint(path)
    got = loaded.model.detector.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # the same file given to a temporal method: its missing parts are listed
    with pytest.raises(VidDetError, match='looks like a single-frame Faster R-CNN R-50 checkpoint') as e:
        VideoDetector.from_checkpoint(str(path), method='dff', device='cpu')
    assert 'missing keys: motion.' in str(e.value)


def test_training_metadata_with_numpy_scalars_loads(tmp_path):
    """mmcv runners store numpy scalars in ``meta`` (seed, hook_msgs); weights_only loading must accept
    them as data, in both the zip and the legacy (``_use_new_zipfile_serialization=False``) format."""
    import numpy as np
    for legacy in (False, True):
        path = tmp_path / f'meta_{legacy}.pth'
        torch.save({'state_dict': {'w': torch.ones(2)},
                    'meta': {'seed': np.int64(3), 'hook_msgs': {'best_score': np.float64(0.5)},
                             'CLASSES': ('a', 'b')}},
                   path, _use_new_zipfile_serialization=not legacy)
        state, meta = read_checkpoint(path)
        assert torch.equal(state['w'], torch.ones(2))
        assert int(meta['seed']) == 3 and float(meta['hook_msgs']['best_score']) == 0.5
        assert class_names(meta) == ('a', 'b')
