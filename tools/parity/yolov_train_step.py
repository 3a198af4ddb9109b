"""One training step of the official YOLOV / YOLOV++ code (YuHengsss/YOLOV), recorded for parity tests.

Runs an official model (``exp.get_model()``: its frozen parts and its losses) in train mode on a
fixed batch of real frames with their ground truth, no augmentation, and writes what it computed:
each loss, the gradient of every trainable tensor (norms, and a few small tensors in full), and
the intermediates a test checks stage by stage: the SimOTA assignment of every frame (foreground
anchors, their ground truth, IoU targets, dynamic k), the candidates the head selected, and the
targets of every BCE / IoU loss term. Run it from the root of an official YOLOV checkout, on the CPU:

    python <this folder>/yolov_train_step.py MODEL CKPT OUT_JSON FRAME [FRAME ...] [--size S]
    MODEL: yolov_s | yolov_l | yolovpp_s | yolovpp_l | yolovpp_swintiny | yolovpp_swinbase | yolovpp_focallarge
    FRAME: an ImageNet VID frame (.../Data/VID/<split>/<video>/<n>.JPEG, its XML beside under
           Annotations/); the batch is the frames in the order given (gframe = their number)

Data, as the official training loader builds each frame (``VIDDataset.pull_item`` then
``TrainTransform``), with the augmentations off (``hsv_prob = flip_prob = 0``): the boxes of the XML
clipped to the image and scaled by r = min(S / h, S / w), the image resized by r (cv2 INTER_LINEAR)
and pasted top-left on an S x S canvas of grey 114, raw 0..255 BGR; targets rows (class, cx, cy, w,
h) of the boxes whose shorter side is > 1 pixel, padded to 50 rows. ``--size`` (default 576) is
the official input size; any multiple of 32 is a size its multi-scale training uses.

The step: ``model.train()``, ``outputs = model(imgs, targets, lframe=0, gframe=B)``,
``outputs['total_loss'].backward()``. Parameters keep the ``requires_grad`` that ``get_model``
gives them (backbone, head stems, cls_convs, reg_convs and reg_preds frozen).

Transformer models (Swin / FocalNet): each ``relative_position_index`` of the checkpoint is replaced by
the one the official model computes when built (a ``make_checkpoint.py`` file holds random numbers
there; a trained one holds this index). ``--no-drop-path`` puts every ``DropPath`` module in eval
mode after ``model.train()``: the frozen backbone's stochastic depth (official rates 0.2 Swin, 0.3
FocalNet, active in the official training) draws random numbers no other code can reproduce; with it
off, the step is deterministic and everything else is the official train-mode step.

Runtime shims, none of which changes a number: ``torch.Tensor.to('cuda')`` -> CPU (two constant
matrices of ``post_trans.Attention_msa``); recording wrappers around the head's ``get_assignments``,
``dynamic_k_matching``, selection, ``bcewithlog_loss`` and ``iou_loss`` (each calls the original
and stores its arguments / results).
"""
import argparse
import hashlib
import json
import os
import sys
import types

import numpy as np
import torch

sys.path.insert(0, os.getcwd())

EXPS = {
    'yolov_s': 'exps/yolov/yolov_s.py',
    'yolov_l': 'exps/yolov/yolov_l.py',
    'yolovpp_s': 'exps/yolov++/v++_base_decoupleReg.py',
    'yolovpp_l': 'exps/yolov++/v++_large_decoupleReg.py',
    'yolovpp_swintiny': 'exps/yolov++/v++_SwinTiny_decoupleReg.py',
    'yolovpp_swinbase': 'exps/yolov++/v++_SwinBaseX_decoupleReg.py',
    'yolovpp_focallarge': 'exps/yolov++/v++_FocalLarge_decoupleReg.py',
}
FULL_GRADS = ('head.obj_preds.0.bias', 'head.obj_preds.1.bias', 'head.obj_preds.2.bias',
              'head.cls_preds.0.bias', 'head.linear_pred.bias', 'head.cls_pred.bias', 'head.obj_pred.bias',
              'head.obj_pred.weight')

_orig_to = torch.Tensor.to


def _cpu_to(self, *args, **kwargs):
    def fix(a):
        if isinstance(a, str) and a.startswith('cuda'):
            return 'cpu'
        if isinstance(a, torch.device) and a.type == 'cuda':
            return torch.device('cpu')
        return a
    args = tuple(fix(a) for a in args)
    if 'device' in kwargs:
        kwargs['device'] = fix(kwargs['device'])
    return _orig_to(self, *args, **kwargs)


torch.Tensor.to = _cpu_to

from yolox.data.data_augment import TrainTransform  # noqa: E402
from yolox.data.datasets import vid  # noqa: E402
from yolox.exp import get_exp  # noqa: E402


def load_frame(path, size):
    """(image (3, S, S) float32, targets (50, 5) float32) as the official training loader makes them."""
    ds = types.SimpleNamespace(dataset_pth='', img_size=(size, size))
    ds.get_annotation = lambda p, s: vid.VIDDataset.get_annotation(ds, p, s)
    img, annos, _info, _p = vid.VIDDataset.pull_item(ds, path)
    return TrainTransform(max_labels=50, flip_prob=0.0, hsv_prob=0.0)(img, annos, (size, size))


def shifted(state, cls_shift, obj_shift):
    """The state dict with ``cls_shift`` / ``obj_shift`` added to the still-image score biases."""
    out = dict(state)
    for k, v in state.items():
        if k.startswith('head.cls_preds.') and k.endswith('.bias'):
            out[k] = v + cls_shift
        elif k.startswith('head.obj_preds.') and k.endswith('.bias'):
            out[k] = v + obj_shift
    return out


def floats(t):
    return [float(v) for v in t.reshape(-1).tolist()]


class Recorder:
    """Stores what the wrapped head methods receive and return."""

    def __init__(self, head, model_name):
        self.assign, self.dynamic_ks, self.bce, self.iou = [], [], [], []
        self.selection = None
        orig_assign, orig_dk = head.get_assignments, head.dynamic_k_matching

        def get_assignments(batch_idx, num_gt, total, *args, **kwargs):
            out = orig_assign(batch_idx, num_gt, total, *args, **kwargs)
            classes, fg_mask, ious, matched, num_fg = out
            self.assign.append(dict(frame=int(batch_idx), num_gt=int(num_gt),
                                    fg_anchors=torch.where(fg_mask)[0].tolist(),
                                    matched_gt=matched.tolist(), matched_class=[int(c) for c in classes.tolist()],
                                    iou_targets=floats(ious), num_fg=int(num_fg)))
            return out

        def dynamic_k_matching(cost, pair_wise_ious, gt_classes, num_gt, fg_mask):
            k = min(10, pair_wise_ious.size(1))
            ks = torch.clamp(torch.topk(pair_wise_ious, k, dim=1)[0].sum(1).int(), min=1)
            self.dynamic_ks.append(dict(candidates=int(pair_wise_ious.size(1)), dynamic_k=ks.tolist()))
            return orig_dk(cost, pair_wise_ious, gt_classes, num_gt, fg_mask)

        head.get_assignments = get_assignments
        head.dynamic_k_matching = dynamic_k_matching
        sel_name = 'postpro_woclass' if model_name.startswith('yolov_') else 'postprocess_widx'
        orig_sel = getattr(head, sel_name)

        def select(*args, **kwargs):
            r = orig_sel(*args, **kwargs)
            rec = dict(idx=[None if t is None else [int(v) for v in t] for t in r[1]])
            if len(r) > 2:
                rec['refine_obj_mask'] = [int(v) for v in torch.as_tensor(r[2]).reshape(-1).tolist()]
                rec['cls_reorder'] = [None if t is None else [int(v) for v in t] for t in r[3]]
            self.selection = rec
            return r
        setattr(head, sel_name, select)
        orig_bce, orig_iou = head.bcewithlog_loss, head.iou_loss

        class RecBCE(torch.nn.Module):
            def forward(inner, x, target):
                t = target.detach().reshape(x.shape)
                loss = orig_bce(x, target)
                self.bce.append(dict(shape=list(x.shape), target_sum=float(t.double().sum()),
                                     target_nonzero=torch.nonzero(t).tolist(), target_values=floats(t[t != 0]),
                                     input_sum=float(x.detach().double().sum()),
                                     loss_sum=float(loss.detach().double().sum())))
                return loss

        class RecIoU(torch.nn.Module):
            def forward(inner, pred, target):
                loss = orig_iou(pred, target)
                self.iou.append(dict(rows=int(pred.shape[0]), target=floats(target),
                                     loss_sum=float(loss.detach().double().sum())))
                return loss

        head.bcewithlog_loss = RecBCE()
        head.iou_loss = RecIoU()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('model', choices=sorted(EXPS))
    p.add_argument('ckpt')
    p.add_argument('out_json')
    p.add_argument('frames', nargs='+')
    p.add_argument('--size', type=int, default=576)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--cls-bias-shift', type=float, default=0.0,
                   help='added to head.cls_preds.*.bias of the checkpoint before loading')
    p.add_argument('--obj-bias-shift', type=float, default=0.0,
                   help='added to head.obj_preds.*.bias of the checkpoint before loading')
    p.add_argument('--no-drop-path', action='store_true',
                   help="DropPath modules in eval mode (the backbone's stochastic depth off)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    exp = get_exp(EXPS[a.model], None)
    model = exp.get_model()
    state = shifted(torch.load(a.ckpt, map_location='cpu')['model'], a.cls_bias_shift, a.obj_bias_shift)
    own = model.state_dict()
    state.update({k: own[k] for k in state if k.endswith('relative_position_index')})
    model.load_state_dict(state, strict=True)
    model.train()
    dropped = [m for m in model.modules() if type(m).__name__ == 'DropPath'] if a.no_drop_path else []
    for m in dropped:
        m.eval()
    rec = Recorder(model.head, a.model)

    imgs, targets, inputs = [], [], []
    for f in a.frames:
        img, tgt = load_frame(os.path.abspath(f), a.size)
        imgs.append(torch.from_numpy(img))
        targets.append(torch.from_numpy(tgt))
        u8 = np.ascontiguousarray(img.astype(np.uint8))
        inputs.append(dict(md5_uint8_chw=hashlib.md5(u8.tobytes()).hexdigest(), sum=float(img.astype(np.float64).sum()),
                           targets=[[float(v) for v in row] for row in tgt if row.sum() > 0]))
    imgs, targets = torch.stack(imgs), torch.stack(targets)

    outputs = model(imgs, targets, lframe=0, gframe=len(a.frames))
    outputs['total_loss'].backward()

    losses = {k: float(v) for k, v in outputs.items()}
    grads, frozen = {}, []
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            frozen.append(name)
            continue
        g = prm.grad
        grads[name] = None if g is None else dict(norm=float(g.double().norm()), sum=float(g.double().sum()),
                                                 full=floats(g) if name in FULL_GRADS else None)
    out = dict(model=a.model, exp_file=EXPS[a.model], checkpoint=os.path.basename(a.ckpt), size=a.size,
               cls_bias_shift=a.cls_bias_shift, obj_bias_shift=a.obj_bias_shift, drop_path_off=len(dropped),
               frames=[os.path.abspath(f).split('/Data/VID/')[-1] for f in a.frames],
               torch=torch.__version__, inputs=inputs, losses=losses,
               assignments=rec.assign, dynamic_ks=rec.dynamic_ks, selection=rec.selection,
               bce_calls=rec.bce, iou_calls=rec.iou, grads=grads, frozen=frozen)
    with open(a.out_json, 'w') as fh:
        json.dump(out, fh)
    print(json.dumps(losses), file=sys.stderr)


if __name__ == '__main__':
    main()
