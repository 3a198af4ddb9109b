"""Reference outputs of the official YOLOV++ transformer-backbone models (Swin-T, Swin-B, FocalNet-L),
for ``tests/test_yolov_backbones.py``.

A wrapper around the shared oracle ``../shared/parity/yolov/oracle/ref_yolov.py`` (which knows the
CSPDarknet models only): it adds the three exp files to that script's model table and runs its
``main`` unchanged (same CPU shims, same VID-evaluation test mode, same JSON layout). Run it, like
the oracle, from the root of the official YOLOV tree in the oracle's environment:

    python <repo>/tools/parity/ref_yolov_backbones.py run MODEL CLIP_DIR CKPT OUT_JSON --threads 1
    python <repo>/tools/parity/ref_yolov_backbones.py fix-index MODEL CKPT_IN CKPT_OUT
    python <repo>/tools/parity/ref_yolov_backbones.py slim FULL_JSON FIXTURE_JSON_GZ

MODEL: yolovpp_swintiny | yolovpp_swinbase | yolovpp_focallarge.

``fix-index``: ``make_checkpoint.py`` draws every 2-D tensor as a linear weight, the Swin
``relative_position_index`` buffers (integer indices, saved in the official checkpoints) included;
cast to int64 on loading they are all 0, so the relative position bias would be one constant per
head and play no part. This step writes the index the official model computes itself (what a
trained checkpoint holds) into a copy of the checkpoint, so that the fixtures exercise the bias.

``slim``: keeps what the tests need (settings, raw frame-0 checksums, per frame the input MD5, the
selected anchors, detections and still detections as label / bbox / score) and gzips it.
"""
import gzip
import importlib.util
import json
import os
import sys

BACKBONE_EXPS = {
    'yolovpp_swintiny': 'exps/yolov++/v++_SwinTiny_decoupleReg.py',
    'yolovpp_swinbase': 'exps/yolov++/v++_SwinBaseX_decoupleReg.py',
    'yolovpp_focallarge': 'exps/yolov++/v++_FocalLarge_decoupleReg.py',
}
ORACLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'parity', 'yolov',
                      'oracle', 'ref_yolov.py')


def _oracle():
    spec = importlib.util.spec_from_file_location('ref_yolov', os.environ.get('YOLOV_ORACLE', ORACLE))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.EXPS.update(BACKBONE_EXPS)
    return mod


def run(argv):
    mod = _oracle()
    sys.argv = [sys.argv[0]] + argv
    mod.main()


def fix_index(model, ckpt_in, ckpt_out):
    import torch
    mod = _oracle()
    exp = mod.get_exp(mod.EXPS[model], None)
    net = exp.get_model()
    ckpt = torch.load(ckpt_in, map_location='cpu')
    own = net.state_dict()
    n = 0
    for k in ckpt['model']:
        if k.endswith('relative_position_index'):
            ckpt['model'][k] = own[k].clone()
            n += 1
    torch.save(ckpt, ckpt_out)
    print(f'{n} relative_position_index buffers set to the official model\'s own', file=sys.stderr)


def slim(full_json, out_gz):
    ref = json.load(open(full_json))

    def dets(rows):
        return [dict(label=d['label'], bbox=d['bbox'], score=d['score']) for d in rows]
    frames = [dict(frame_id=f['frame_id'], file_name=f['file_name'], image_size=f['image_size'], ratio=f['ratio'],
                   md5_uint8_chw=f['input']['md5_uint8_chw'], selected_anchor_idx=f['selected_anchor_idx'],
                   detections=dets(f['detections']), still_detections=dets(f['still_detections']))
              for f in ref['frames']]
    out = {k: ref[k] for k in ('model', 'exp_file', 'clip', 'checkpoint', 'reference', 'settings',
                               'seconds_per_frame')}
    out['batches'] = [dict(frames=b['frames'], raw_frame0=b['raw_frame0']) for b in ref['batches']]
    out['frames'] = frames
    with gzip.open(out_gz, 'wt') as f:
        json.dump(out, f)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == 'run':
        run(args)
    elif cmd == 'fix-index':
        fix_index(*args)
    elif cmd == 'slim':
        slim(*args)
    else:
        raise SystemExit(__doc__)


if __name__ == '__main__':
    main()
