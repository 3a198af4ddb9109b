"""The checks of a training config across its fields (run after the typed conversion)."""
from __future__ import annotations

from viddet.config.typed import method_settings
from viddet.errors import VidDetError
from viddet.methods import METHOD_NAMES, METHODS, method_class

REF_METHODS = ('uniform', 'bilateral_uniform')


def validate(cfg) -> None:
    """Raises :class:`VidDetError` naming the file and the dotted key of the first bad value of
    ``cfg`` (a :class:`viddet.config.training.Config`)."""
    src = cfg.source

    def err(msg):
        return VidDetError(f'{src}: {msg}')
    m = cfg.model
    if m.method not in METHOD_NAMES:
        raise err(f'model.method must be one of {", ".join(METHOD_NAMES)}, got {m.method!r}')
    if not method_class(m.method).trainable:
        raise err(f'model.method: {method_class(m.method).title} cannot be trained in viddet yet (inference only)')
    method = method_class(m.method)
    if m.backbone not in method.train_backbones:
        raise err(f'model.backbone must be one of {", ".join(method.train_backbones)}, got {m.backbone!r}')
    method_settings(method, m.test, src, 'model.test')
    if not m.classes:
        raise err('model.classes is empty')
    if len(set(m.classes)) != len(m.classes):
        raise err('model.classes has duplicate names')
    for k, v in (('model.rpn_train_proposals', m.rpn_train_proposals), ('model.rcnn_samples', m.rcnn_samples)):
        if v is not None and v < 1:
            raise err(f'{k} must be >= 1, got {v}')
    if m.backbone_frozen_stages is not None and not 0 <= m.backbone_frozen_stages <= (18 if m.backbone == 'mobilenetv2' else 4):
        raise err(f'model.backbone_frozen_stages must be in 0..{18 if m.backbone == "mobilenetv2" else 4} for '
                  f'{m.backbone}, got {m.backbone_frozen_stages}')
    if m.flownet not in ('train', 'frozen', 'zero'):
        raise err(f'model.flownet must be train, frozen or zero, got {m.flownet!r}')
    if m.flownet != 'train' and not method.has_flownet:
        with_flownet = ', '.join(x.name for x in METHODS if x.has_flownet)
        raise err(f'model.flownet={m.flownet} but method {m.method} has no FlowNet (only {with_flownet})')
    needs_refs = 1 if method.train_num_refs else 0
    for i, t in enumerate(cfg.data.train):
        r = t.ref_sampler
        if r is not None:
            if r.method not in REF_METHODS:
                raise err(f'data.train.{i}.ref_sampler.method must be one of {", ".join(REF_METHODS)}, got {r.method!r}')
            if r.num_ref_imgs < 0 or r.frame_range < 0:
                raise err(f'data.train.{i}.ref_sampler: num_ref_imgs and frame_range must be >= 0')
        if needs_refs and (r is None or r.num_ref_imgs < needs_refs):
            raise err(f'data.train.{i}.ref_sampler: method {m.method} needs reference frames '
                      f'(e.g. ref_sampler: {{num_ref_imgs: {method.train_num_refs}, frame_range: 9}})')
    d = cfg.data
    if len(d.scale) != 2 or min(d.scale) < 16:
        raise err(f'data.scale must be [long, short] pixels >= 16, got {list(d.scale)}')
    if not 0.0 <= d.flip_ratio <= 1.0:
        raise err(f'data.flip_ratio must be in [0, 1], got {d.flip_ratio}')
    if not 0.0 <= d.hsv_prob <= 1.0:
        raise err(f'data.hsv_prob must be in [0, 1], got {d.hsv_prob}')
    if d.hsv_prob > 0 and not method.per_frame_augment:
        with_hsv = ', '.join(x.name for x in METHODS if x.per_frame_augment)
        raise err(f'data.hsv_prob={d.hsv_prob} but method {m.method} has no HSV jitter (only {with_hsv}); set it to 0')
    if d.samples_per_gpu < 1:
        raise err(f'data.samples_per_gpu must be >= 1, got {d.samples_per_gpu}')
    if d.workers < 0:
        raise err(f'data.workers must be >= 0, got {d.workers}')
    if d.val is not None and d.val.mode not in ('offline', 'online'):
        raise err(f'data.val.mode must be offline or online, got {d.val.mode!r}')
    _validate_schedule(cfg.schedule, err)
    if cfg.eval.interval < 0:
        raise err(f'eval.interval must be >= 0, got {cfg.eval.interval}')


def _validate_schedule(s, err) -> None:
    """The checks of ``schedule.*`` (``err(message)`` makes the :class:`VidDetError`)."""
    if s.epochs < 1:
        raise err(f'schedule.epochs must be >= 1, got {s.epochs}')
    if s.lr <= 0:
        raise err(f'schedule.lr must be > 0, got {s.lr}')
    if s.lr_batch < 0 or s.warmup_iters < 0 or s.log_interval < 1:
        raise err('schedule.lr_batch and schedule.warmup_iters must be >= 0, schedule.log_interval >= 1')
    if not 0 < s.warmup_ratio <= 1:
        raise err(f'schedule.warmup_ratio must be in (0, 1], got {s.warmup_ratio}')
    if sorted(s.steps) != list(s.steps) or any(x < 1 for x in s.steps):
        raise err(f'schedule.steps must be increasing epochs >= 1, got {s.steps}')
    if s.max_nonfinite_steps < 1:
        raise err(f'schedule.max_nonfinite_steps must be >= 1, got {s.max_nonfinite_steps}')
    if s.policy not in ('step', 'yolox_cos'):
        raise err(f'schedule.policy must be step or yolox_cos, got {s.policy!r}')
    if not 0 < s.min_lr_ratio <= 1 or not 0 <= s.final_epochs < s.epochs:
        raise err(f'schedule.min_lr_ratio must be in (0, 1] and schedule.final_epochs in 0..epochs-1, got '
                  f'{s.min_lr_ratio} and {s.final_epochs}')
    if s.nesterov and s.momentum <= 0:
        raise err('schedule.nesterov needs schedule.momentum > 0')
    if s.ema_decay is not None and not 0 < s.ema_decay < 1:
        raise err(f'schedule.ema_decay must be in (0, 1) or null (no EMA), got {s.ema_decay}')
    if s.ema_ramp < 0:
        raise err(f'schedule.ema_ramp must be >= 0 (updates; 0: no ramp), got {s.ema_ramp}')
    if s.grad_clip is not None and s.grad_clip <= 0:
        raise err(f'schedule.grad_clip must be > 0 or null, got {s.grad_clip}')
