"""One MMTracking 0.14 training step, recorded stage by stage: a viddet training-parity fixture.

Run with the MMTracking 0.14 environment (see ``README.md`` beside this file), not with viddet. It
builds MMTracking's model from its own R-50 config (its ``train_cfg``: assigners, samplers, proposal
counts, losses), loads a checkpoint made by ``../shared/parity/make_checkpoint.py``, runs
``model(return_loss=True, ...)`` (``forward_train``) on one real sample, sums the losses as mmdet's
``_parse_losses`` does and back-propagates, in ``model.train()`` mode (stem + layer1 frozen, BN in
eval mode). Besides the losses and every parameter's gradient norm (the fields of
``../shared/parity/train/*.json``) it records MMTracking's intermediate values:

* ``rpn_targets``: the anchors its RPN sampler drew (positives, negatives) and the positives'
  regression targets;
* ``proposals``: the key frame's proposal list that enters the R-CNN sampler (boxes, scores, and for
  each the anchor it came from and that anchor's RPN logit);
* ``rcnn_sampling`` / ``rcnn_targets``: the RoIs the R-CNN sampler drew (indices into the
  gt-prepended candidate list), their assigned gt, labels, label weights and regression targets;
* ``ref_proposals`` (SELSA, Temporal RoI Align): each reference frame's test-RPN proposals, which the
  key RoIs attend to;
* ``thread_spread``: the same step again at another thread count, and what changed.

The recording is done by subclasses of MMTracking's / mmdet's heads (``RecordingRPNHead``,
``RecordingStandardRoIHead``, ``RecordingSelsaRoIHead``), registered under their own names and named
in the config instead of the originals: each calls the original method and keeps a copy of what it
saw or returned; nothing the model computes is changed (the state-dict keys are the same).

Preprocessing is MMTracking's test pipeline (cv2 read, keep-ratio bilinear resize of the uint8 image
to (1000, 600), normalise, pad to 16, no flip): its train pipeline minus the random flip. The
samplers draw from torch's global RNG, seeded with ``--rng-seed`` right before ``forward_train``: RPN
sampler first, then the R-CNN sampler.

usage: python train_stages.py METHOD SNIPPET_DIR ANN_DIR CKPT OUT_JSON --key K --refs R1 [R2]
           --ckpt-seed N [--rng-seed S] [--still] [--threads 2] [--spread-threads 1]
"""
import argparse
import inspect
import json
import os
import sys
import time
import xml.etree.ElementTree as ET

import mmcv
import numpy as np
import torch
from mmcv import Config
from mmcv.runner import load_checkpoint
from mmdet.models import HEADS, RPNHead, StandardRoIHead
from mmdet.models.builder import ROI_EXTRACTORS

import mmtrack
from mmtrack.models import build_model
from mmtrack.models.roi_heads import SelsaRoIHead, TemporalRoIAlign

CFG_ROOT = os.path.join(os.path.dirname(mmtrack.__file__), '.mim', 'configs')
CONFIGS = {
    'dff': 'vid/dff/dff_faster_rcnn_r50_dc5_1x_imagenetvid.py',
    'fgfa': 'vid/fgfa/fgfa_faster_rcnn_r50_dc5_1x_imagenetvid.py',
    'selsa': 'vid/selsa/selsa_faster_rcnn_r50_dc5_1x_imagenetvid.py',
    'troi': 'vid/temporal_roi_align/selsa_troialign_faster_rcnn_r50_dc5_7e_imagenetvid.py',
}
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
SYNSETS = ['n02691156', 'n02419796', 'n02131653', 'n02834778', 'n01503061', 'n02924116', 'n02958343',
           'n02402425', 'n02084071', 'n02121808', 'n02503517', 'n02118333', 'n02510455', 'n02342885',
           'n02374451', 'n02129165', 'n01674464', 'n02484322', 'n03790512', 'n02324045', 'n02509815',
           'n02411705', 'n01726692', 'n02355227', 'n02129604', 'n04468005', 'n01662784', 'n04530566',
           'n02062744', 'n02391049']

RECORD = {}
"""What the recording heads saw during the current forward_train (cleared before each run)."""
SIM_TIE = 1e-6
"""Temporal RoI Align: a RoI point's top-k locations are recorded where the k-th and (k+1)-th cosine
similarities are at most this far apart (float noise between implementations: ~1e-7)."""


# ------------------------------------------------------------------------------ recording heads
@HEADS.register_module()
class RecordingRPNHead(RPNHead):
    """mmdet's ``RPNHead``, keeping a copy of its anchor targets and of each image's proposals with
    the anchor (and logit) each proposal came from."""

    def get_targets(self, *args, **kwargs):
        res = super().get_targets(*args, **kwargs)
        # labels, label_weights, bbox_targets, bbox_weights: per level (num_imgs, anchors); one level
        RECORD['rpn_targets'] = [t[0][0].detach().clone() for t in res[:4]]
        return res

    def _get_bboxes_single(self, cls_score_list, bbox_pred_list, score_factor_list, mlvl_anchors,
                           img_meta, cfg, *args, **kwargs):
        assert len(cls_score_list) == 1, 'one feature level (DC5)'
        RECORD['_image'] = (cls_score_list[0].detach(), mlvl_anchors[0].detach())
        return super()._get_bboxes_single(cls_score_list, bbox_pred_list, score_factor_list, mlvl_anchors,
                                          img_meta, cfg, *args, **kwargs)

    def _bbox_post_process(self, mlvl_scores, mlvl_bboxes, mlvl_valid_anchors, level_ids, cfg,
                           img_shape, **kwargs):
        dets = super()._bbox_post_process(mlvl_scores, mlvl_bboxes, mlvl_valid_anchors, level_ids, cfg,
                                          img_shape, **kwargs)
        # which candidate each kept proposal is: NMS returns rows of the decoded candidates unchanged
        scores, anchors = torch.cat(mlvl_scores), torch.cat(mlvl_valid_anchors)
        boxes = self.bbox_coder.decode(anchors, torch.cat(mlvl_bboxes), max_shape=img_shape)
        same = (dets[:, None, :4] == boxes[None]).all(-1) & (dets[:, None, 4] == scores[None])
        assert bool(same.any(1).all()), 'a proposal matches no candidate exactly'
        cand = same.float().argmax(1)
        logits, grid = RECORD.pop('_image')
        index = {tuple(r): i for i, r in enumerate(grid.tolist())}
        anchor_ids = torch.tensor([index[tuple(r)] for r in anchors[cand].tolist()], dtype=torch.long)
        flat_logits = logits.permute(1, 2, 0).reshape(-1)   # location-major, as the anchors
        RECORD.setdefault('rpn_proposals', []).append(
            dict(dets=dets.detach().clone(), anchors=anchor_ids, logits=flat_logits[anchor_ids].clone()))
        return dets


class _RecordingRoIHead:
    """Keeps the proposal list entering the R-CNN sampler, the sampling result and its targets."""

    def forward_train(self, *args, **kwargs):
        a = inspect.signature(super().forward_train).bind(*args, **kwargs).arguments
        RECORD['proposal_list'] = [p.detach().clone() for p in a['proposal_list']]
        # the assigner is deterministic: asking it again gives what the sampler drew from
        RECORD['assigned'] = self.bbox_assigner.assign(a['proposal_list'][0], a['gt_bboxes'][0], None,
                                                       a['gt_labels'][0]).gt_inds.clone()
        if 'ref_proposal_list' in a:
            RECORD['ref_proposal_list'] = [p.detach().clone() for p in a['ref_proposal_list']]
        return super().forward_train(*args, **kwargs)

    def _bbox_forward_train(self, *args, **kwargs):
        a = inspect.signature(super()._bbox_forward_train).bind(*args, **kwargs).arguments
        RECORD['sampling'] = a['sampling_results']
        RECORD['rcnn_targets'] = [t.detach().clone() for t in self.bbox_head.get_targets(
            a['sampling_results'], a['gt_bboxes'], a['gt_labels'], self.train_cfg)]
        return super()._bbox_forward_train(*args, **kwargs)


@HEADS.register_module()
class RecordingStandardRoIHead(_RecordingRoIHead, StandardRoIHead):
    """mmdet's ``StandardRoIHead`` (DFF, FGFA), recording."""


@HEADS.register_module()
class RecordingSelsaRoIHead(_RecordingRoIHead, SelsaRoIHead):
    """MMTracking's ``SelsaRoIHead`` (SELSA, Temporal RoI Align), recording."""


@ROI_EXTRACTORS.register_module()
class RecordingTemporalRoIAlign(TemporalRoIAlign):
    """MMTracking's ``TemporalRoIAlign``, recording the most-similar locations it picked wherever the
    choice is float-tied (the k-th and (k+1)-th similarities within ``SIM_TIE``)."""

    def most_similar_roi_align(self, roi_feats, ref_feats):
        out = super().most_similar_roi_align(roi_feats, ref_feats)
        # the similarity maps once more, by the same operations as MMTracking's method
        with torch.no_grad():
            roi_e = roi_feats / roi_feats.norm(p=2, dim=1, keepdim=True)
            ref_e = ref_feats / ref_feats.norm(p=2, dim=1, keepdim=True)
            n, c, h, w = roi_e.shape
            t, _, fh, fw = ref_e.shape
            sim = roi_e.permute(0, 2, 3, 1).contiguous().view(-1, c).mm(
                ref_e.permute(1, 0, 2, 3).contiguous().view(c, -1)).view(-1, t, fh * fw)
            k = self.num_most_similar_points
            values, indices = sim.topk(k=k, dim=2, largest=True)
            # check that these are the locations MMTracking used: its output from them
            flat = ref_feats.permute(2, 3, 0, 1).contiguous().view(-1, t, c)
            again = torch.stack([(flat[indices[:, i], i, :] * values[:, i].softmax(-1).unsqueeze(-1)).sum(1)
                                 for i in range(t)]).view(t, n, h, w, c).permute(0, 1, 4, 2, 3)
            assert torch.equal(again, out), 'recomputed most-similar locations differ from MMTracking\'s'
            gap = values[:, :, k - 1] - sim.topk(k=k + 1, dim=2).values[:, :, k]
            near = (gap <= SIM_TIE).nonzero()
            RECORD['troi_most_similar'] = dict(
                sim_tie=SIM_TIE, k=k, num_points=int(sim.shape[0]), num_frames=t,
                points=[[int(p), int(f)] + indices[p, f].tolist() for p, f in near.tolist()],
                gaps=f32(gap[near[:, 0], near[:, 1]]))
        return out


def load_cfg(method):
    """MMTracking's R-50 config of ``method`` without pretrained weights, with the recording heads."""
    cfg = Config.fromfile(os.path.join(CFG_ROOT, CONFIGS[method]))
    cfg.model.pop('pretrains', None)
    for k in ('motion', 'detector'):
        if k in cfg.model:
            cfg.model[k].pop('init_cfg', None)
            if k == 'detector':
                cfg.model[k].backbone.pop('init_cfg', None)
    det = cfg.model.detector
    assert det.rpn_head.type == 'RPNHead'
    det.rpn_head.type = 'RecordingRPNHead'
    det.roi_head.type = {'StandardRoIHead': 'RecordingStandardRoIHead',
                         'SelsaRoIHead': 'RecordingSelsaRoIHead'}[det.roi_head.type]
    if det.roi_head.bbox_roi_extractor.type == 'TemporalRoIAlign':
        det.roi_head.bbox_roi_extractor.type = 'RecordingTemporalRoIAlign'
    return cfg


# ------------------------------------------------------------------------------ inputs
def prep(path):
    """(3, Hp, Wp) tensor and img_meta exactly as MMTracking's test pipeline makes them."""
    img = mmcv.imread(path)
    h, w = img.shape[:2]
    res, _ = mmcv.imrescale(img, (1000, 600), return_scale=True, interpolation='bilinear', backend='cv2')
    nh, nw = res.shape[:2]
    sf = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    norm = mmcv.imnormalize(res, MEAN, STD, to_rgb=True)
    pad = mmcv.impad_to_multiple(norm, 16, pad_val=0)
    t = torch.from_numpy(pad.transpose(2, 0, 1).copy())
    meta = dict(filename=path, ori_shape=(h, w, 3), img_shape=(nh, nw, 3), pad_shape=pad.shape,
                scale_factor=sf, flip=False, flip_direction=None, img_norm_cfg=dict(mean=MEAN, std=STD, to_rgb=True))
    return t, meta


def gt_of(xml_path, meta):
    """GT boxes (n, 4) in resized pixels (x1 y1 x2 y2, clipped as mmdet's Resize does) and 0-based labels."""
    root = ET.parse(xml_path).getroot()
    boxes, labels = [], []
    for o in root.findall('object'):
        b = o.find('bndbox')
        x1, y1, x2, y2 = (float(b.find(k).text) for k in ('xmin', 'ymin', 'xmax', 'ymax'))
        boxes.append([x1, y1, x2, y2])  # MMTracking's converter: w = xmax - xmin, so x2 = xmax
        labels.append(SYNSETS.index(o.find('name').text))
    boxes = np.array(boxes, np.float32).reshape(-1, 4) * meta['scale_factor']
    h, w = meta['img_shape'][:2]
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    return torch.from_numpy(boxes), torch.tensor(labels, dtype=torch.long)


def inputs(a):
    """forward_train's keyword arguments for the sample, and what the fixture says about it."""
    name = lambda i: os.path.join(a.snippet_dir, f'{i:06d}.JPEG')  # noqa: E731
    img, meta = prep(name(a.key))
    meta.update(is_video_data=not a.still, frame_id=a.key)
    gt_b, gt_l = gt_of(os.path.join(a.ann_dir, f'{a.key:06d}.xml'), meta)
    refs = [a.key] * len(a.refs) if a.still else a.refs
    ref_imgs, ref_metas, ref_gt_b, ref_gt_l = [], [], [], []
    for j, r in enumerate(refs):
        t, m = prep(name(r))
        m.update(is_video_data=not a.still, frame_id=r)
        ref_imgs.append(t)
        ref_metas.append(m)
        b, l = gt_of(os.path.join(a.ann_dir, f'{r:06d}.xml'), m)
        ref_gt_b.append(torch.cat([torch.full((len(b), 1), float(j)), b], 1))
        ref_gt_l.append(torch.stack([torch.full((len(l),), j, dtype=torch.long), l], 1))
    kwargs = dict(img=img[None], img_metas=[meta], gt_bboxes=[gt_b], gt_labels=[gt_l],
                  ref_img=torch.stack(ref_imgs)[None], ref_img_metas=[ref_metas],
                  ref_gt_bboxes=[torch.cat(ref_gt_b)], ref_gt_labels=[torch.cat(ref_gt_l)],
                  gt_instance_ids=[torch.zeros(len(gt_b), dtype=torch.long)],
                  ref_gt_instance_ids=[torch.zeros(sum(len(b) for b in ref_gt_b), 2, dtype=torch.long)])

    def cks(t):
        return dict(shape=list(t.shape), sum=float(t.double().sum()), sum_sq=float((t.double() ** 2).sum()))

    frames_dir = '/'.join(os.path.normpath(a.snippet_dir).split(os.sep)[-4:])
    info = dict(
        snippet=os.path.basename(os.path.normpath(a.snippet_dir)), frames_dir=frames_dir,
        key_file=os.path.basename(name(a.key)), ref_files=[os.path.basename(name(r)) for r in refs],
        key_frame=a.key, ref_frames=refs, is_video_data=not a.still,
        preprocessing='test pipeline: cv2 imread, keep-ratio resize to (1000, 600) bilinear on uint8, '
                      'normalise mean (123.675, 116.28, 103.53) std (58.395, 57.12, 57.375) BGR->RGB, '
                      'pad to a multiple of 16 with 0, no flip',
        img_shape=list(meta['img_shape'][:2]), pad_shape=list(meta['pad_shape'][:2]),
        scale_factor=[float(v) for v in meta['scale_factor']],
        gt_bboxes=f32(gt_b), gt_labels=gt_l.tolist(),
        input_checksums=dict(img=cks(img), ref_imgs=[cks(t) for t in ref_imgs]))
    return kwargs, info


# ------------------------------------------------------------------------------ one step
def f32(t):
    """Nested lists of the shortest decimal strings that give back the same float32 values."""
    a = np.asarray(t.detach().cpu() if torch.is_tensor(t) else t, dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [f32(v) for v in a] if a.ndim > 1 else [float(str(v)) for v in a]


def step(model, kwargs, rng_seed, threads):
    """One forward_train + backward at ``threads`` threads: (losses, total, grad norms, total grad
    norm, the recorded intermediates)."""
    torch.set_num_threads(threads)
    RECORD.clear()
    model.zero_grad()
    torch.manual_seed(rng_seed)
    losses = model(return_loss=True, **kwargs)
    loss, log_vars = model._parse_losses(losses)
    loss.backward()
    grads = {k: (None if v.grad is None else f32(v.grad.norm())) for k, v in model.named_parameters()}
    with_grad = [v for v in model.parameters() if v.requires_grad and v.grad is not None]
    total_grad_norm = f32(torch.nn.utils.clip_grad_norm_(with_grad, max_norm=1e30, norm_type=2))
    return log_vars, float(loss), grads, total_grad_norm, dict(RECORD)


def proposal_record(p):
    return dict(boxes=f32(p['dets'][:, :4]), scores=f32(p['dets'][:, 4]), anchors=p['anchors'].tolist(),
                logits=f32(p['logits']))


def stages(rec, gt_b):
    """The intermediate fields of the fixture from one step's record."""
    props = rec['rpn_proposals']
    key = rec['proposal_list'][0]
    assert torch.equal(props[0]['dets'], key), 'the first RPN proposal list is the key frame\'s training one'
    labels, label_weights, bbox_targets, bbox_weights = rec['rpn_targets']
    sampled = label_weights > 0
    pos = sampled & (labels == 0)     # mmdet RPN: foreground label 0, background num_classes (1)
    neg = sampled & (labels == 1)
    assert bool((sampled == (pos | neg)).all()) and bool((bbox_weights[~pos] == 0).all())
    out = dict(
        rpn_targets=dict(pos_anchors=pos.nonzero().view(-1).tolist(), neg_anchors=neg.nonzero().view(-1).tolist(),
                         pos_bbox_targets=f32(bbox_targets[pos])),
        proposals=proposal_record(props[0]))
    res = rec['sampling'][0]
    cand = torch.cat([gt_b, key[:, :4]])
    assert res.num_gts == len(gt_b) and torch.equal(res.pos_bboxes, cand[res.pos_inds]) \
        and torch.equal(res.neg_bboxes, cand[res.neg_inds])
    out['rcnn_assigned_gt_inds'] = rec['assigned'].tolist()
    out['rcnn_sampling'] = dict(pos_inds=res.pos_inds.tolist(), neg_inds=res.neg_inds.tolist(), num_gts=res.num_gts,
                                pos_assigned_gt_inds=res.pos_assigned_gt_inds.tolist(),
                                pos_gt_labels=res.pos_gt_labels.tolist(), pos_is_gt=res.pos_is_gt.int().tolist())
    t_labels, t_weights, t_targets, t_bbox_weights = rec['rcnn_targets']
    npos = len(res.pos_inds)
    assert bool((t_bbox_weights[:npos] == 1).all()) and bool((t_bbox_weights[npos:] == 0).all())
    assert bool((t_targets[npos:] == 0).all())
    out['rcnn_targets'] = dict(labels=t_labels.tolist(), label_weights=f32(t_weights),
                               pos_bbox_targets=f32(t_targets[:npos]))
    if 'ref_proposal_list' in rec:
        assert len(props) == 1 + len(rec['ref_proposal_list'])
        for p, q in zip(props[1:], rec['ref_proposal_list']):
            assert torch.equal(p['dets'], q)
        out['ref_proposals'] = [proposal_record(p) for p in props[1:]]
    if 'troi_most_similar' in rec:
        out['troi_most_similar'] = rec['troi_most_similar']
    return out


def order_change(a, b):
    """Proposal list ``b`` as a change of list ``a``: its length and [position, anchor] where they differ."""
    return dict(length=len(b['anchors']), changed=[[i, y] for i, (x, y) in enumerate(
        zip(a['anchors'] + [None] * len(b['anchors']), b['anchors'])) if x != y])


def differences(a, b):
    """The stages at which two records of the same step took other decisions (empty: none): other
    proposals or another order (by anchor), other anchors or RoIs drawn, other assignments or
    labels. Float noise in boxes, scores and targets is not a difference."""
    out = []
    if a['proposals']['anchors'] != b['proposals']['anchors']:
        out.append('proposals')
    if [r['anchors'] for r in a.get('ref_proposals', [])] != [r['anchors'] for r in b.get('ref_proposals', [])]:
        out.append('ref_proposals')
    for k in ('rcnn_assigned_gt_inds', 'rcnn_sampling'):
        if a[k] != b[k]:
            out.append(k)
    if 'troi_most_similar' in a:   # a near-tied point both runs recorded, with other locations
        pa, pb = ({(q[0], q[1]): sorted(q[2:]) for q in r['troi_most_similar']['points']} for r in (a, b))
        if any(pa[q] != pb[q] for q in pa.keys() & pb.keys()):
            out.append('troi_most_similar')
    if a['rcnn_targets']['labels'] != b['rcnn_targets']['labels']:
        out.append('rcnn_targets')
    ra, rb = a['rpn_targets'], b['rpn_targets']
    if (ra['pos_anchors'], ra['neg_anchors']) != (rb['pos_anchors'], rb['neg_anchors']):
        out.append('rpn_targets')
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('method', choices=sorted(CONFIGS))
    p.add_argument('snippet_dir')
    p.add_argument('ann_dir')
    p.add_argument('ckpt')
    p.add_argument('out_json')
    p.add_argument('--key', type=int, required=True)
    p.add_argument('--refs', type=int, nargs='+', required=True)
    p.add_argument('--rng-seed', type=int, default=0)
    p.add_argument('--still', action='store_true', help='is_video_data=False (an ImageNet DET image)')
    p.add_argument('--ckpt-seed', type=int, required=True, help='the --seed the checkpoint was made with')
    p.add_argument('--threads', type=int, default=2, help='torch threads of the recorded step (2)')
    p.add_argument('--spread-threads', type=int, default=1,
                   help='run the step again at this many threads and record what changes (0: skip)')
    a = p.parse_args()

    cfg = load_cfg(a.method)
    model = build_model(cfg.model)
    load_checkpoint(model, a.ckpt, map_location='cpu', strict=True)
    model.train()
    kwargs, info = inputs(a)
    gt_b = kwargs['gt_bboxes'][0]

    t0 = time.perf_counter()
    log_vars, total, grads, total_grad_norm, rec = step(model, kwargs, a.rng_seed, a.threads)
    seconds = time.perf_counter() - t0
    recorded = stages(rec, gt_b)
    out = dict(
        method=a.method, backbone='r50',
        checkpoint=f'make_checkpoint.py keys/{a.method}_r50.txt --seed {a.ckpt_seed}',
        checkpoint_keys=f'{a.method}_r50.txt', checkpoint_seed=a.ckpt_seed, rng_seed=a.rng_seed, **info,
        losses={k: f32(v) for k, v in log_vars.items()},
        total_loss=f32(total),
        grad_norms=grads, total_grad_norm=total_grad_norm,
        threads=a.threads, **recorded)
    if a.spread_threads:
        log2, total2, grads2, tgn2, rec2 = step(model, kwargs, a.rng_seed, a.spread_threads)
        other = stages(rec2, gt_b)
        rel = [abs(grads2[k] - v) / v for k, v in grads.items() if v and grads2[k] is not None]
        out['thread_spread'] = dict(
            threads=a.spread_threads,
            losses={k: f32(v) for k, v in log2.items()},
            total_grad_norm=tgn2,
            grad_norm_max_rel_diff=max(rel),
            grad_norm_spread={k: float(f'{abs(grads2[k] - v) / v:.3g}') for k, v in grads.items()
                              if v and grads2[k] is not None and abs(grads2[k] - v) > 1e-4 * v},
            loss_max_rel_diff=max(abs(log2[k] - v) / max(abs(v), 1e-12) for k, v in log_vars.items()),
            stages_that_differ=differences(recorded, other))
        for k in out['thread_spread']['stages_that_differ']:   # what the other run decided, compactly
            out['thread_spread'][k] = (order_change(recorded[k], other[k]) if k == 'proposals' else
                                       [order_change(a, b) for a, b in zip(recorded[k], other[k])]
                                       if k == 'ref_proposals' else other[k])
    out['made_by'] = ('tools/parity/train_stages.py ' + ' '.join(
        [a.method, info['frames_dir'], info['frames_dir'].replace('Data/', 'Annotations/', 1),
         f'CKPT({a.method}_r50 seed {a.ckpt_seed})', 'OUT', '--key', str(a.key), '--refs', *map(str, a.refs),
         '--ckpt-seed', str(a.ckpt_seed), '--rng-seed', str(a.rng_seed), '--threads', str(a.threads),
         '--spread-threads', str(a.spread_threads)] + (['--still'] if a.still else [])))
    out['reference'] = (f'MMTracking {mmtrack.__version__} forward_train + backward (model.train(): frozen stage 1, '
                        f'BN eval), mmcv-full {mmcv.__version__}, torch {torch.__version__} CPU, {a.threads} threads; '
                        f'total = mmdet _parse_losses; {seconds:.0f} s')
    with open(a.out_json, 'w') as f:
        json.dump(out, f, separators=(',', ':'))
    print(json.dumps(dict(out['losses'], spread=out.get('thread_spread', {}).get('stages_that_differ'))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
