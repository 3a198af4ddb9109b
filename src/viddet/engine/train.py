"""``viddet train``: the training loop for every method, one process or many (torchrun, DDP).

Recipe: MMTracking's ImageNet VID training (REFERENCE.md §1.9, §3.1, §4.2, §5.3-§5.4), one key
frame per sample, losses per sample as in mmdet (see :mod:`viddet.models.losses` and
:mod:`viddet.methods.training`).

Determinism and batching
    Every sample is a pure function of ``(schedule.seed, epoch, dataset index)``: the epoch's
    order is a seeded permutation, and each item is loaded with its own ``random.Random`` (reference
    frames, flip) and its own ``torch.Generator`` (anchor and RoI sampling), derived from that
    triple. So the data does not depend on the number of processes, DataLoader workers, or on
    whether training was interrupted:

    * optimizer step ``s`` of an epoch consumes the consecutive slice ``order[s*B:(s+1)*B]``,
      B = world_size x samples_per_gpu x accumulate (the last slice wraps around to the epoch's
      start, like ``DistributedSampler`` padding); rank r takes the r-th part of it and splits it
      into ``accumulate`` micro-batches;
    * each micro-batch's loss is the mean of its samples' losses divided by ``accumulate``, and DDP
      averages gradients over ranks, so the gradient is the mean over the B samples whatever the
      split — ``--accumulate k`` on one process reproduces k processes (or a k x larger batch),
      up to float summation order;
    * ``--resume`` restores model, optimizer, grad scaler, RNG states and the position, and skips
      the steps already done in the epoch: the continued run is bit-identical to an uninterrupted
      one (on CPU; cuDNN kernels may add GPU non-determinism).

Learning rate: ``schedule.lr * total_batch / schedule.lr_batch``, linear warm-up by optimizer step,
step decay by epoch (mmcv ``StepLrUpdaterHook`` semantics).

Outputs in the work dir (all written atomically): ``epoch_<e>.pth`` after each epoch,
``iter_<i>.pth`` when ``--max-iters`` stops mid-epoch, ``last_checkpoint`` (name of the newest),
``config.yaml``, ``train_log.jsonl`` (one JSON line per logged step), ``tf_logs/`` (TensorBoard),
``eval_epoch_<e>/`` (detections, metrics, plots). A checkpoint holds ``state_dict`` in the same
key layout as MMTracking's (``detector.*``, ``motion.*``, ``aggregator.*``), so ``viddet test`` /
``viddet demo --checkpoint`` load it directly, plus ``optimizer``, ``scheduler``, ``scaler``,
``rng``, ``epoch``, ``iter`` and ``meta`` {CLASSES, method, backbone, config, epoch, iter}.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from viddet.checkpoints import load_into, load_partial, read_checkpoint, resolve_checkpoint
from viddet.config import Config, save_config
from viddet.errors import VidDetError
from viddet.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from viddet.methods import method_class
from viddet.models.mobilenet import MobileNetV2Lite
from viddet.runtime import init_distributed, resolve_device, set_threads
from viddet.structures import TrainSample
from viddet.version import __version__

CHECKPOINT_POINTER = 'last_checkpoint'


# ===================================================================================== model + init
def init_weights_like_mmdet(model: nn.Module) -> nn.Module:
    """Initialises the parts that are trained from scratch as mmdet/mmcv 2.x/1.x ``init_cfg`` does.

    * neck ``ChannelMapper``: Xavier uniform, bias 0 (``init_cfg=Xavier(layer='Conv2d')``);
    * ``RPNHead`` convs: normal std 0.01, bias 0 (``init_cfg=Normal(layer='Conv2d', std=0.01)``);
    * ``Shared2FCBBoxHead``: shared fcs Xavier uniform, ``fc_cls`` normal std 0.01, ``fc_reg``
      normal std 0.001, biases 0 (``BBoxHead`` / ``ConvFCBBoxHead`` default ``init_cfg``);
    * mmcv ``ConvModule`` convs (FGFA ``EmbedAggregator``, Temporal RoI Align ``embed_network``,
      FlowNetSimple when no FlowNet weights are given): Kaiming normal, ``mode='fan_out'``,
      nonlinearity relu (leaky_relu with slope 0.1 for FlowNet's activated convs), bias 0;
    * ``SelsaAggregator`` linears keep PyTorch's default (MMTracking gives them no ``init_cfg``).

    The backbone is left alone (it gets ImageNet weights, or stays at PyTorch's default init).
    """
    det = model.detector

    def xavier(m):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

    def normal(m, std):
        nn.init.normal_(m.weight, 0.0, std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

    def kaiming(m, a=0.0, nonlinearity='relu'):
        nn.init.kaiming_normal_(m.weight, a=a, mode='fan_out', nonlinearity=nonlinearity)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

    for m in det.neck.modules():
        if isinstance(m, nn.Conv2d):
            xavier(m)
    for m in (det.rpn_head.rpn_conv, det.rpn_head.rpn_cls, det.rpn_head.rpn_reg):
        normal(m, 0.01)
    head = det.roi_head.bbox_head
    for m in head.shared_fcs:
        xavier(m)
    normal(head.fc_cls, 0.01)
    normal(head.fc_reg, 0.001)
    extractor = det.roi_head.bbox_roi_extractor
    if extractor is not None and getattr(extractor, 'embed_network', None) is not None:
        kaiming(extractor.embed_network.conv)
    if hasattr(model, 'aggregator'):
        for m in model.aggregator.modules():
            if isinstance(m, nn.Conv2d):
                kaiming(m)
    if hasattr(model, 'motion'):
        for m in model.motion.modules():
            if hasattr(m, 'conv') and isinstance(m.conv, (nn.Conv2d, nn.ConvTranspose2d)):
                leaky = isinstance(getattr(m, 'act', None), nn.LeakyReLU)
                kaiming(m.conv, a=0.1 if leaky else 0.0, nonlinearity='leaky_relu' if leaky else 'relu')
    return model


def build_train_model(cfg: Config) -> nn.Module:
    """The method module of ``cfg.model`` with its training settings applied and the from-scratch
    parts initialised like mmdet (:func:`init_weights_like_mmdet`)."""
    m = cfg.model
    cls = method_class(m.method)
    model = cls.build(m.backbone, m.num_classes, **cls.settings_of(m.test))
    tc = cls.train_config()
    if m.rpn_train_proposals is not None:
        tc.rpn_proposal_max_per_img = m.rpn_train_proposals
    if m.rcnn_samples is not None:
        tc.rcnn_sampler.num = m.rcnn_samples
    model.train_cfg = tc
    if m.backbone_frozen_stages is not None:
        model.detector.backbone.frozen_stages = m.backbone_frozen_stages
        model.detector.backbone.train(model.detector.backbone.training)  # applies the freezing
    init_weights_like_mmdet(model)
    if m.flownet != 'train':
        configure_flownet(model, m.flownet)
    return model


def configure_flownet(model: nn.Module, mode: str) -> None:
    """``frozen``: FlowNet parameters get ``requires_grad=False``. ``zero``: additionally the final
    ``predict_flow`` conv is zeroed, so the predicted flow is exactly 0 (features are warped by a
    zero flow; with MMTracking's warp that is the identity up to its (W-1)/W contraction)."""
    if mode == 'zero':
        with torch.no_grad():
            model.motion.predict_flow.conv.weight.zero_()
    for p in model.motion.parameters():
        p.requires_grad = False


def _state_from_file(path: str, what: str) -> Dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise VidDetError(f'{what} file {path} does not exist')
    state, _ = read_checkpoint(p)
    return state


def load_backbone_weights(model: nn.Module, path: str, verbose: bool = True) -> Tuple[List[str], List[str]]:
    """Initialises ``model.detector.backbone`` from ImageNet weights.

    Accepted files: torchvision ResNet-50/101 or ResNeXt-101 64x4d state dicts (keys ``conv1.*``,
    ``layerK.*``; ``fc.*`` is ignored), the same with a ``backbone.`` / ``detector.backbone.`` /
    ``module.`` prefix (mmdet/MMTracking files), or torchvision MobileNetV2 weights (``features.*``)
    for the ``mobilenetv2`` backbone. Like mmdet's ``init_cfg=Pretrained``, loading is not strict:
    the missing and unused keys are returned and printed.

    Raises:
        VidDetError: unreadable file, no key of the backbone in it, or a shape mismatch (names the
            file, the key and both shapes — e.g. ResNet-101 weights for a ResNet-50 backbone).
    """
    backbone = model.detector.backbone
    state = _state_from_file(path, 'backbone weights')
    if isinstance(backbone, MobileNetV2Lite):
        def rename(k):   # torchvision's features.N (N < 18); features.18 and the classifier go unused
            return k if k.startswith('features.') else 'features.' + k
    else:
        def rename(k):   # torchvision / mmdet / MMTracking / DDP spellings of the ResNet keys
            for prefix in ('module.', 'detector.', 'backbone.'):
                k = k[len(prefix):] if k.startswith(prefix) else k
            return k
    missing, unused = load_partial(backbone, state, f'backbone weights {path}', rename)
    if verbose:
        print(f'backbone weights: {path}: loaded {len(backbone.state_dict()) - len(missing)} tensors'
              + (f'; missing in file ({len(missing)}): {", ".join(missing[:8])}{" …" if len(missing) > 8 else ""}'
                 if missing else '')
              + (f'; unused ({len(unused)}): {", ".join(unused[:6])}{" …" if len(unused) > 6 else ""}' if unused else ''))
    return missing, unused


def load_flownet_weights(model: nn.Module, path: str, verbose: bool = True) -> None:
    """Initialises ``model.motion`` (FlowNetSimple) from MMTracking's ``flownet_simple.pth``
    (bare keys ``conv1.0.conv.weight`` ... or with the ``motion.`` prefix). Strict.

    Raises:
        VidDetError: the method has no FlowNet, unreadable file, or missing / unexpected keys.
    """
    if not model.has_flownet:
        raise VidDetError(f'init.flownet_weights is set but method {model.name!r} has no FlowNet')
    state = _state_from_file(path, 'FlowNet weights')
    if any(k.startswith('motion.') for k in state):
        state = {k[len('motion.'):]: v for k, v in state.items() if k.startswith('motion.')}
    load_into(model.motion, state, f'FlowNet weights {path}')
    if verbose:
        print(f'FlowNet weights: {path}: loaded {len(state)} tensors')


def load_full_checkpoint(model: nn.Module, spec: str, verbose: bool = True) -> None:
    """Loads a complete viddet/MMTracking checkpoint (path, URL or zoo name) strictly."""
    path = resolve_checkpoint(spec)
    state, _ = read_checkpoint(path)
    load_into(model, state, str(path))
    if verbose:
        print(f'initial checkpoint: {path}')


# ===================================================================================== data
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of ``epoch`` (independent of process layout); all >= 0."""
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(s[0]) << 31) ^ int(s[1])) & ((1 << 63) - 1)


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The epoch's sample order: a permutation of range(n) seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, 1 << 40))
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, total_batch: int) -> int:
    """Optimizer steps per epoch: ceil(n / total_batch) (the last batch wraps around)."""
    return max(1, math.ceil(n / total_batch))


def step_indices(order: Sequence[int], step: int, total_batch: int) -> List[int]:
    """The ``total_batch`` dataset indices of optimizer step ``step`` (wrapping around the order)."""
    n = len(order)
    return [order[(step * total_batch + i) % n] for i in range(total_batch)]


class SeededTrainSet(torch.utils.data.Dataset):
    """Training items keyed by ``(epoch, index)``, each drawn with its own seeded RNGs.

    Wraps :class:`viddet.data.video_dataset.VideoDataset` objects (concatenated) and returns
    :class:`viddet.structures.TrainSample`. The sub-dataset's ``rng`` (reference sampling and
    flip) is set to ``random.Random(sample_seed(seed, epoch, index))`` just before the item is
    loaded, and the sample's ``seed`` (anchor/RoI sampling) is derived from the same triple.
    """

    def __init__(self, datasets: Sequence, seed: int):
        self.datasets = list(datasets)
        self.seed = seed
        self.cum = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.cum[-1] if self.cum else 0

    def locate(self, index: int):
        for d, c in zip(self.datasets, self.cum):
            if index < c:
                return d, index - (c - len(d))
        raise IndexError(index)

    def __getitem__(self, key):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        ds, local = self.locate(index)
        ds.rng = random.Random(s)
        item = ds[local]
        return TrainSample(img=item['img'], ref_imgs=item['ref_imgs'], metas=list(item['img_metas']),
                           gt_bboxes=item['gt_bboxes'].float(), gt_labels=item['gt_labels'].long(),
                           is_video_data=bool(item['is_video_data']), seed=s ^ 0x5DEECE66D)


def build_train_set(cfg: Config) -> SeededTrainSet:
    """The concatenated training sets of ``cfg.data.train`` (MMTracking: VID + DET)."""
    from viddet.data.video_dataset import VideoDataset
    sets = []
    for i, t in enumerate(cfg.data.train):
        ref = None
        if t.ref_sampler is not None and t.ref_sampler.num_ref_imgs > 0:
            r = t.ref_sampler
            ref = dict(num_ref_imgs=r.num_ref_imgs, frame_range=r.frame_range,
                       filter_key_img=r.filter_key_img, method=r.method)
        ds = VideoDataset(t.ann_file, t.img_prefix, load_as_video=t.load_as_video, ref_sampler=ref,
                          classes=cfg.model.classes, min_size=cfg.data.min_size, img_scale=tuple(cfg.data.scale),
                          flip_ratio=cfg.data.flip_ratio)
        if len(ds) == 0:
            raise VidDetError(f'{cfg.source}: data.train.{i} ({t.ann_file}) has no usable training image '
                              f'(none with an annotation of the {cfg.model.num_classes} classes)')
        sets.append(ds)
    return SeededTrainSet(sets, cfg.schedule.seed)


def _collate(items):
    return list(items)


# ===================================================================================== schedule
@dataclass
class LrSchedule:
    """Linear warm-up by step + step decay by epoch (mmcv ``StepLrUpdaterHook``, ``by_epoch``).

    lr(epoch, it) = base * gamma ** #{s in steps: epoch >= s}, times
    ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)`` while ``it < warmup_iters``
    (``epoch`` 0-based, ``it`` = global optimizer step, 0-based).
    """
    base_lr: float
    steps: Sequence[int]
    gamma: float
    warmup_iters: int
    warmup_ratio: float

    def lr(self, epoch: int, it: int) -> float:
        lr = self.base_lr * self.gamma ** sum(1 for s in self.steps if epoch >= s)
        if it < self.warmup_iters:
            k = (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
            lr = lr * (1 - k)
        return lr

    def state_dict(self) -> dict:
        return dict(type='step_linear_warmup', base_lr=self.base_lr, steps=list(self.steps), gamma=self.gamma,
                    warmup_iters=self.warmup_iters, warmup_ratio=self.warmup_ratio)


# ===================================================================================== checkpoints
def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, stored with weights_only-loadable types."""
    py = random.getstate()
    npst = np.random.get_state()
    st = dict(python=[py[0], list(py[1]), py[2]],
              numpy=[npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
              torch=torch.get_rng_state())
    if torch.cuda.is_available():
        st['cuda'] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py = st['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(st['torch'])
    if 'cuda' in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st['cuda'])


def save_checkpoint(path: Path, model: nn.Module, optimizer, schedule: LrSchedule, scaler, epoch: int,
                    it: int, cfg: Config, epoch_done: bool, total_batch: int = 1) -> Path:
    """Writes a training checkpoint atomically (temp file + ``os.replace``) and updates the
    ``last_checkpoint`` pointer beside it.

    ``epoch`` = epochs completed (epoch_done) or the 0-based epoch in progress; ``it`` = optimizer
    steps done in total.
    """
    import io
    m = cfg.model
    obj = dict(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
               optimizer=optimizer.state_dict(), scheduler=schedule.state_dict(),
               scaler=scaler.state_dict() if scaler is not None else None,
               rng=rng_state(), epoch=epoch, iter=it, epoch_done=epoch_done, total_batch=total_batch,
               meta=dict(CLASSES=list(m.classes), method=m.method, backbone=m.backbone, config=cfg.to_dict(),
                         epoch=epoch, iter=it, viddet_version=__version__))
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(path.parent / CHECKPOINT_POINTER, path.name + '\n')
    return path


def latest_checkpoint(work_dir: Path) -> Optional[Path]:
    """The checkpoint named in ``work_dir/last_checkpoint`` (or the newest ``*.pth`` by iteration)."""
    pointer = work_dir / CHECKPOINT_POINTER
    if pointer.is_file():
        p = work_dir / pointer.read_text().strip()
        if p.is_file():
            return p
    best, best_it = None, -1
    for p in work_dir.glob('*.pth'):
        try:
            it = int(torch.load(p, map_location='cpu', weights_only=True).get('iter', -1))
        except Exception:  # noqa: BLE001 - a damaged file is skipped
            continue
        if it > best_it:
            best, best_it = p, it
    return best


# ===================================================================================== distributed
class _TrainForward(nn.Module):
    """Routes ``forward`` to ``forward_train`` so that DDP's gradient hooks fire."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.forward_train(batch)


# ===================================================================================== evaluation
def evaluate_model(model: nn.Module, cfg: Config, out_dir: Path, device: torch.device,
                   progress: bool = True) -> Optional[dict]:
    """Scores the trained weights on ``cfg.data.val`` exactly as ``viddet test`` would score their
    checkpoint: a fresh model built with the test settings ``cfg.model.test`` gets the trained state
    dict (fast paths on), and :func:`viddet.engine.evaluate.run_test` runs it over the val videos,
    sharded over the processes under DDP (every rank must call this), then rank 0 reports COCO AP50
    and the VID mAP (:func:`viddet.evaluation.report.evaluate_and_report`).

    Returns:
        the metrics dict on rank 0, None on the other ranks or when ``cfg.data.val`` is not set.
    """
    from viddet import speedups
    from viddet.api import VideoDetector
    from viddet.engine.evaluate import run_test
    from viddet.evaluation.report import evaluate_and_report
    v = cfg.data.val
    if v is None:
        return None
    test_model = build_train_model(cfg)
    test_model.load_state_dict(model.state_dict())
    test_model.eval()
    if cfg.model.test.fast:
        speedups.enable(test_model)
    detector = VideoDetector(test_model, cfg.model.classes, device, scale=tuple(cfg.data.scale), test=cfg.model.test)
    # resume: a resumed training run re-evaluates the same weights; what an interrupted
    # evaluation saved is reused, a finished one just re-scored
    results = run_test(detector, v.ann_file, v.img_prefix, out_dir, mode=v.mode, max_videos=v.max_videos,
                       progress=progress, resume=True)
    if results is None:
        return None
    ann = out_dir / 'annotations_subset.json' if v.max_videos is not None else v.ann_file
    return evaluate_and_report(results, str(ann), motion_iou=v.motion_iou, out_dir=str(out_dir),
                               json_path=str(out_dir / 'metrics.json'))


# ===================================================================================== the loop
@dataclass
class TrainResult:
    """What :func:`train` returns: final step/epoch, last checkpoint and the evaluation metrics."""
    iters: int
    epochs_done: int
    checkpoint: Optional[Path]
    metrics: Optional[dict]
    last_losses: Dict[str, float]


def _nonfinite(losses: Dict[str, torch.Tensor]) -> List[str]:
    return [f"{k} = {float(v.detach())}" for k, v in losses.items() if not math.isfinite(float(v.detach()))]


def train(cfg: Config, work_dir, *, resume: bool = False, amp: Optional[str] = None, accumulate: int = 1,
          max_iters: Optional[int] = None, val_interval: Optional[int] = None, device: str = 'auto',
          progress: bool = True, evaluate: bool = True, verbose: bool = True,
          threads: Optional[int] = None) -> TrainResult:
    """Trains ``cfg`` (see module docstring). Under ``torchrun`` every process calls this.

    Args:
        cfg: a validated :class:`viddet.config.Config`.
        work_dir: checkpoints, logs and evaluations go here.
        resume: continue from the work dir's latest checkpoint (error if there is none).
        amp: None, ``'bf16'`` or ``'fp16'`` (autocast; fp16 adds a dynamic GradScaler starting at
            512, MMTracking's fp16 loss scale).
        accumulate: micro-batches per optimizer step (a k x larger effective batch).
        max_iters: stop after this many optimizer steps in total (checkpoint ``iter_<n>.pth``).
        val_interval: evaluate every N epochs (overrides ``cfg.eval.interval``; 0 = end only).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``.
        progress: tqdm bar (rank 0). evaluate: run the evaluation(s) at all.
        threads: ``torch.set_num_threads`` for this process (None: torch's default). On a CPU
            shared with other jobs, 1 thread per process avoids OpenMP spin-waiting, which can make
            training 10x slower.

    Returns:
        :class:`TrainResult` (``metrics`` only on rank 0).

    Raises:
        VidDetError: missing data/init files (checked before anything is built), a non-finite loss
            (naming the iteration and the loss; the last good checkpoint is left intact), a
            resume without checkpoint, bad arguments.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from viddet.models.losses import sum_losses

    if accumulate < 1:
        raise VidDetError(f'--accumulate must be >= 1, got {accumulate}')
    if amp not in (None, 'bf16', 'fp16'):
        raise VidDetError(f'--amp must be bf16 or fp16, got {amp!r}')
    if max_iters is not None and max_iters < 1:
        raise VidDetError(f'--max-iters must be >= 1, got {max_iters}')
    cfg.check_paths(need_val=evaluate)
    set_threads(threads)
    work_dir = Path(work_dir)
    dev = resolve_device(device)
    if amp == 'fp16' and dev.type == 'cpu':
        raise VidDetError('--amp fp16 needs a GPU (CPU autocast supports bf16: use --amp bf16)')
    ckpt = None
    if resume:
        ckpt_path = latest_checkpoint(work_dir)
        if ckpt_path is None:
            raise VidDetError(f'--resume: no checkpoint in {work_dir}')
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)

    dist, rank, world = init_distributed(dev)
    if dev.type == 'cuda' and world > 1:
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', rank)))
        torch.cuda.set_device(dev)
    sched_cfg = cfg.schedule
    spg = cfg.data.samples_per_gpu
    total_batch = world * spg * accumulate
    base_lr = sched_cfg.lr * (total_batch / sched_cfg.lr_batch if sched_cfg.lr_batch else 1.0)
    schedule = LrSchedule(base_lr, sched_cfg.steps, sched_cfg.gamma, sched_cfg.warmup_iters, sched_cfg.warmup_ratio)

    # ---- data (fails on bad annotation files before the model is built)
    train_set = build_train_set(cfg)
    n = len(train_set)
    spe = steps_per_epoch(n, total_batch)

    # ---- model
    torch.manual_seed(sched_cfg.seed)
    model = build_train_model(cfg)
    if ckpt is None:
        if cfg.init.backbone_weights:
            load_backbone_weights(model, cfg.init.backbone_weights, verbose and rank == 0)
        if cfg.init.flownet_weights:
            load_flownet_weights(model, cfg.init.flownet_weights, verbose and rank == 0)
            if cfg.model.flownet == 'zero':
                configure_flownet(model, 'zero')
        if cfg.init.checkpoint:
            load_full_checkpoint(model, cfg.init.checkpoint, verbose and rank == 0)
    else:
        model.load_state_dict(ckpt['state_dict'])
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=sched_cfg.momentum, weight_decay=sched_cfg.weight_decay)
    scaler = None
    if amp == 'fp16':
        scaler = torch.amp.GradScaler(dev.type, init_scale=512.0)
    wrapper: nn.Module = _TrainForward(model)
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel
        wrapper = DistributedDataParallel(wrapper, device_ids=[dev.index] if dev.type == 'cuda' else None)

    start_epoch, start_step, it = 0, 0, 0
    if ckpt is not None:
        if int(ckpt.get('total_batch', total_batch)) != total_batch:
            raise VidDetError(f'--resume: the checkpoint was trained with a total batch of {ckpt["total_batch"]} '
                              f'(processes x samples_per_gpu x accumulate), this run has {total_batch}; '
                              'resume with the same layout')
        optimizer.load_state_dict(ckpt['optimizer'])
        if scaler is not None and ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'])
        it = int(ckpt['iter'])
        if ckpt.get('epoch_done', True):
            start_epoch, start_step = int(ckpt['epoch']), 0
        else:
            start_epoch, start_step = int(ckpt['epoch']), it - int(ckpt['epoch']) * spe
        if verbose and rank == 0:
            print(f'resumed from {latest_checkpoint(work_dir)}: epoch {start_epoch + 1}, step {start_step} of {spe}, '
                  f'iteration {it}')

    if rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, work_dir / 'config.yaml')
    writer = SummaryWriter(str(work_dir / 'tf_logs')) if rank == 0 else None
    log_path = work_dir / 'train_log.jsonl'
    total_steps = spe * sched_cfg.epochs
    end_it = total_steps if max_iters is None else min(total_steps, max_iters)
    interval = cfg.eval.interval if val_interval is None else val_interval
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)) \
        if amp else contextlib.nullcontext
    if verbose and rank == 0:
        print(f'training {cfg.model.method} ({cfg.model.backbone}) on {n} samples: {world} process(es) x '
              f'{spg} sample(s) x {accumulate} accumulation = batch {total_batch}, lr {base_lr:g}, '
              f'{spe} steps/epoch, {sched_cfg.epochs} epochs, device {dev}' + (f', amp {amp}' if amp else ''))
    bar = tqdm(total=end_it, initial=it, unit='it', desc=f'train {cfg.model.method}', disable=not progress or rank != 0,
               dynamic_ncols=True)
    last_ckpt = latest_checkpoint(work_dir) if resume else None
    metrics = None
    last_losses: Dict[str, float] = {}
    log_acc: Dict[str, float] = {}
    log_count = 0
    t_last = time.perf_counter()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, sched_cfg.epochs):
            if it >= end_it:
                break
            order = epoch_order(n, sched_cfg.seed, epoch)
            first = start_step if epoch == start_epoch else 0
            steps = range(first, spe)
            keys = []
            for s in steps:
                idx = step_indices(order, s, total_batch)[rank * spg * accumulate:(rank + 1) * spg * accumulate]
                keys.extend([(epoch, i) for i in idx[j * spg:(j + 1) * spg]] for j in range(accumulate))
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=keys, num_workers=cfg.data.workers,
                                                 collate_fn=_collate, pin_memory=False)
            micro_iter = iter(loader)
            for s in steps:
                if it >= end_it:
                    break
                lr = schedule.lr(epoch, it)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                t0 = time.perf_counter()
                step_losses: Dict[str, float] = {}
                data_time = 0.0
                for j in range(accumulate):
                    td = time.perf_counter()
                    samples = [x.to(dev) for x in next(micro_iter)]
                    data_time += time.perf_counter() - td
                    sync = contextlib.nullcontext() if (dist is None or j == accumulate - 1) else wrapper.no_sync()
                    with sync:
                        with autocast():
                            losses = wrapper(samples)
                        total = sum_losses(losses)
                        bad = _nonfinite(losses)
                        if dist is not None:
                            flag = torch.tensor([1.0 if bad else 0.0], device=dev)
                            dist.all_reduce(flag)
                            if flag.item() > 0 and not bad:
                                bad = ['(on another process)']
                        if bad:
                            where = f' (last good checkpoint: {last_ckpt})' if last_ckpt else ' (no checkpoint saved yet)'
                            raise VidDetError(f'non-finite loss at iteration {it + 1} (epoch {epoch + 1}, step {s + 1}): '
                                              f'{", ".join(bad)}; training stopped{where}')
                        loss = total / accumulate
                        if scaler is not None:
                            scaler.scale(loss).backward()
                        else:
                            loss.backward()
                    for k, v in losses.items():
                        step_losses[k] = step_losses.get(k, 0.0) + float(v.detach()) / accumulate
                    step_losses["loss"] = step_losses.get("loss", 0.0) + float(total.detach()) / accumulate
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = None
                if sched_cfg.grad_clip is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, sched_cfg.grad_clip, norm_type=2))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                it += 1
                last_losses = step_losses
                dt = time.perf_counter() - t0
                for k, v in step_losses.items():
                    log_acc[k] = log_acc.get(k, 0.0) + v
                log_count += 1
                if rank == 0:
                    bar.set_postfix(loss=f'{step_losses["loss"]:.3f}', lr=f'{lr:.2e}', epoch=epoch + 1)
                    bar.update(1)
                    if it % sched_cfg.log_interval == 0 or it == end_it:
                        now = time.perf_counter()
                        rec = {k: v / log_count for k, v in log_acc.items()}
                        rec.update(iter=it, epoch=epoch + 1, lr=lr, time=dt, data_time=data_time,
                                   sec_per_iter=(now - t_last) / log_count)
                        if grad_norm is not None:
                            rec['grad_norm'] = grad_norm
                        for k, v in rec.items():
                            if k not in ('iter', 'epoch'):
                                writer.add_scalar(('train/' if k.startswith('loss') or k == 'acc' else 'meta/') + k, v, it)
                        with open(log_path, 'a') as f:
                            f.write(json.dumps(rec) + '\n')
                        log_acc, log_count, t_last = {}, 0, now
            if it == (epoch + 1) * spe:  # the epoch is complete
                if rank == 0:
                    last_ckpt = save_checkpoint(work_dir / f'epoch_{epoch + 1}.pth', model, optimizer, schedule, scaler,
                                                epoch + 1, it, cfg, epoch_done=True, total_batch=total_batch)
                if evaluate and interval and (epoch + 1) % interval == 0 and (epoch + 1) != sched_cfg.epochs \
                        and cfg.data.val is not None:
                    metrics = evaluate_model(model, cfg, work_dir / f'eval_epoch_{epoch + 1}', dev, progress)
                    _log_metrics(writer, metrics, it)
                    model.train()
                if dist is not None:
                    dist.barrier()
            else:  # stopped by --max-iters inside the epoch
                if rank == 0:
                    last_ckpt = save_checkpoint(work_dir / f'iter_{it}.pth', model, optimizer, schedule, scaler,
                                                epoch, it, cfg, epoch_done=False, total_batch=total_batch)
                if dist is not None:
                    dist.barrier()
                break
        bar.close()
        finished_all = it >= total_steps
        if evaluate and cfg.data.val is not None and cfg.eval.at_end:
            tag = f'eval_epoch_{sched_cfg.epochs}' if finished_all else f'eval_iter_{it}'
            metrics = evaluate_model(model, cfg, work_dir / tag, dev, progress)
            _log_metrics(writer, metrics, it)
        if dist is not None:
            dist.barrier()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return TrainResult(it, it // spe, last_ckpt, metrics, last_losses)


def _log_metrics(writer, metrics: Optional[dict], it: int):
    if writer is None or not metrics:
        return
    for k in ('coco_ap50', 'vid_map', 'vid_map_slow', 'vid_map_medium', 'vid_map_fast'):
        if metrics.get(k) is not None:
            writer.add_scalar(f'val/{k}', metrics[k], it)
