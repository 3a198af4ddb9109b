"""What a training run starts from: the model with its training settings, mmdet's initialisation of
the parts trained from scratch, ImageNet backbone weights, FlowNet weights, and a full checkpoint
to fine-tune (its classifier and box regressor re-initialised for another set of classes).

MMTracking 0.14 starts every backbone from ImageNet weights (``init_cfg=dict(type='Pretrained',
checkpoint='torchvision://resnet50')`` etc.) and DFF/FGFA's FlowNet from ``flownet_simple.pth``
(``motion.init_cfg``); viddet does the same by default (:func:`init_plan`) and never starts from
random weights unless the config says ``random``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from torch import nn

from viddet.checkpoints.download import resolve_checkpoint, resolve_init_weights
from viddet.checkpoints.loading import load_into, load_partial
from viddet.checkpoints.reading import check_finite, class_names, describe, describe_state_dict, read_checkpoint, with_detector_prefix
from viddet.config.training import Config, RANDOM_INIT
from viddet.errors import VidDetError
from viddet.methods import method_class
from viddet.models.backbones import BACKBONE_NAMES, BACKBONES, backbone_info
from viddet.models.mobilenet import MobileNetV2Lite
from viddet.models.yolov_mobilenet import MobileNetV2Body

# ===================================================================================== model + init
def build_train_model(cfg: Config) -> nn.Module:
    """The method module of ``cfg.model`` with its training settings applied
    (:meth:`~viddet.methods.base.VIDMethod.configure_training`) and the parts trained from scratch
    initialised as the reference implementation does
    (:meth:`~viddet.methods.base.VIDMethod.init_weights`); no weights are loaded."""
    m = cfg.model
    cls = method_class(m.method)
    model = cls.build(m.backbone, m.num_classes, **m.settings(cfg.source).build_kwargs())
    model.init_weights()
    model.configure_training(m)    # after the init: a zeroed FlowNet stays zero
    return model


# ===================================================================================== what to load
@dataclass
class InitPlan:
    """The initial weights of a run (:func:`init_plan`): each a file, URL or zoo name, ``random``,
    or None (nothing to load: no FlowNet, a zero flow, or the part comes from ``checkpoint``)."""
    backbone: Optional[str]
    flownet: Optional[str]
    checkpoint: Optional[str]


def init_plan(cfg: Config) -> InitPlan:
    """Applies the defaults of ``cfg.init`` and refuses to start silently from random weights.

    Backbone: ``init.backbone_weights``, else (without ``init.checkpoint``) the backbone's ImageNet
    weights (``BACKBONES[...].imagenet_weights``, e.g. ``torchvision://resnet50``). FlowNet (DFF,
    FGFA): ``init.flownet_weights``, else (without checkpoint, unless ``model.flownet: zero``)
    MMTracking's ``flownet_simple``.

    Raises:
        VidDetError: a backbone without known ImageNet weights and no ``init.backbone_weights``
            (say ``random`` to train it from random weights), or FlowNet weights for a method
            without FlowNet.
    """
    i, m = cfg.init, cfg.model
    backbone = i.backbone_weights
    if backbone is None and not i.checkpoint:
        backbone = backbone_info(m.backbone).imagenet_weights if m.backbone in BACKBONE_NAMES else None
        if backbone is None:
            raise VidDetError(f'{cfg.source}: init.backbone_weights is not set and backbone {m.backbone} has no '
                              f'published ImageNet weights: set init.backbone_weights (or --backbone-weights) to '
                              f'a weights file, or to {RANDOM_INIT} to train it from random weights (or start from '
                              f'init.checkpoint)')
    _check_backbone_fits(backbone, m.backbone, cfg.source)
    flownet = i.flownet_weights
    if not method_class(m.method).has_flownet:
        if flownet not in (None, RANDOM_INIT):
            raise VidDetError(f'{cfg.source}: init.flownet_weights is set but method {m.method} has no FlowNet')
        flownet = None
    elif flownet is None and not i.checkpoint and m.flownet != 'zero':
        flownet = 'flownet_simple'
    return InitPlan(backbone, flownet, i.checkpoint)


def _check_backbone_fits(spec: Optional[str], backbone: str, source: str) -> None:
    """Refuses, before any download, the published ImageNet weights of another backbone
    (``BACKBONES[...].imagenet_weights``), e.g. ``torchvision://resnet50`` for ``mobilenetv2``.

    Raises:
        VidDetError: naming the weights, the backbone they are for and the one configured.
    """
    owners = [b for b in BACKBONES if b.imagenet_weights is not None and b.imagenet_weights == spec]
    if owners and all(b.name != backbone for b in owners):
        own = backbone_info(backbone).imagenet_weights
        fit = (f'its own are {own}' if own else
               f'it has no published ImageNet weights: give a weights file or {RANDOM_INIT}')
        raise VidDetError(f'{source}: init.backbone_weights {spec} are the ImageNet weights of backbone '
                          f'{owners[0].name} ({owners[0].title}) and do not fit backbone {backbone} ({fit})')


def resolve_plan(plan: InitPlan, progress: bool = True) -> InitPlan:
    """The plan with every name and URL replaced by its local file (downloaded into the cache
    once; :func:`viddet.checkpoints.resolve_init_weights`, :func:`~viddet.checkpoints.resolve_checkpoint`).

    Raises:
        VidDetError: a missing file or a failed download (naming the URL and the cache path).
    """
    def local(spec, key):
        return spec if spec in (None, RANDOM_INIT) else str(resolve_init_weights(spec, key, progress))
    return InitPlan(local(plan.backbone, 'init.backbone_weights'), local(plan.flownet, 'init.flownet_weights'),
                    str(resolve_checkpoint(plan.checkpoint, progress)) if plan.checkpoint else None)


def initialise(model: nn.Module, cfg: Config, plan: InitPlan, say: Callable[[str], None] = print) -> None:
    """Loads the resolved ``plan`` into a model of :func:`build_train_model`: backbone, FlowNet,
    then the fine-tuning checkpoint over them (:func:`load_finetune_checkpoint`); ``say`` gets
    one line per part saying what was loaded (or that it stays random, as asked)."""
    for part, spec in (('backbone', plan.backbone), ('FlowNet', plan.flownet)):
        if spec == RANDOM_INIT:
            say(f'{part}: random initial weights (init.{part.lower()}_weights: {RANDOM_INIT})')
    if plan.backbone not in (None, RANDOM_INIT):
        load_backbone_weights(model, plan.backbone, say)
    if plan.flownet not in (None, RANDOM_INIT):
        load_flownet_weights(model, plan.flownet, say)
    if plan.checkpoint:
        load_finetune_checkpoint(model, plan.checkpoint, cfg, backbone_given=plan.backbone is not None,
                                 flownet_given=plan.flownet is not None, say=say)
    if cfg.model.flownet == 'zero':
        model.freeze_flownet(zero=True)   # after loading: the flow stays exactly 0


def _state_from_file(path: str, what: str):
    p = Path(path)
    if p.is_dir():
        raise VidDetError(f'{what} {path} is a folder, not a weights file')
    if not p.is_file():
        raise VidDetError(f'{what} file {path} does not exist')
    state, _ = read_checkpoint(p)
    return state


def _listed(keys: List[str], n: int = 6) -> str:
    return ', '.join(keys[:n]) + (f' … (+{len(keys) - n} more)' if len(keys) > n else '')


def _quiet(_msg: str) -> None:
    pass


def load_backbone_weights(model: nn.Module, path: str, say: Callable[[str], None] = _quiet
                          ) -> Tuple[List[str], List[str]]:
    """Initialises ``model.imagenet_body`` (the backbone, or the YOLOV family's ``mobilenetv2`` body
    under its neck, which keeps its initialisation) from ImageNet weights.

    Accepted files: torchvision ResNet-50/101 or ResNeXt-101 64x4d state dicts (keys ``conv1.*``,
    ``layerK.*``; ``fc.*`` is ignored) — their keys are mmdet's ``ResNet``/``ResNeXt`` keys, so they
    map onto :class:`viddet.models.backbones.ResNetDC5` unchanged, as mmcv's non-strict
    ``load_checkpoint`` loads them —, the same with a ``backbone.`` / ``detector.backbone.`` /
    ``module.`` prefix (mmdet/MMTracking files), or torchvision MobileNetV2 weights
    (``features.*``) for the ``mobilenetv2`` backbones. Every body parameter must be in the file
    (``num_batches_tracked`` counters aside), so that no part of it stays random unnoticed.

    Returns:
        (missing, unused): backbone keys the file did not give (only ``num_batches_tracked``), and
        the file's unused keys.

    Raises:
        VidDetError: unreadable file, a shape mismatch (naming the file, the key and both shapes —
            e.g. ResNet-101 weights for a ResNet-50 backbone), or backbone tensors missing in it.
    """
    backbone = model.imagenet_body
    state = _state_from_file(path, 'backbone weights')
    if isinstance(backbone, (MobileNetV2Lite, MobileNetV2Body)):
        def rename(k):   # torchvision's features.N (N < 18); features.18 and the classifier go unused
            return k if k.startswith('features.') else 'features.' + k
    else:
        def rename(k):   # torchvision / mmdet / MMTracking / DDP spellings of the ResNet keys
            for prefix in ('module.', 'detector.', 'backbone.'):
                k = k[len(prefix):] if k.startswith(prefix) else k
            return k
    missing, unused = load_partial(backbone, state, f'backbone weights {path}', rename)
    lacking = [k for k in missing if not k.endswith('num_batches_tracked')]
    if lacking:
        raise VidDetError(f'backbone weights {path} lack {len(lacking)} of the {len(backbone.state_dict())} '
                          f'tensors of the {type(backbone).__name__} ({_listed(lacking)}): weights of another '
                          f'network? (unused keys of the file: {_listed(unused, 4)})')
    rest = len(model.backbone.state_dict()) - len(backbone.state_dict())
    say(f'backbone weights: {path}: loaded {len(backbone.state_dict()) - len(missing)} tensors'
        + (f' into the {type(backbone).__name__} ({rest} tensors of the neck keep their initialisation)'
           if rest else '')
        + (f'; unused ({len(unused)}): {_listed(unused)}' if unused else ''))
    return missing, unused


def load_flownet_weights(model: nn.Module, path: str, say: Callable[[str], None] = _quiet) -> None:
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
    say(f'FlowNet weights: {path}: loaded {len(state)} tensors')


@dataclass
class FinetuneReport:
    """What :func:`load_finetune_checkpoint` did, key lists in the model's order.

    Attributes:
        loaded: tensors taken from the checkpoint. reinitialised: the class-dependent head tensors
        left at mmdet's initialisation (other classes). not_in_checkpoint: model tensors the
        checkpoint lacks (initialised otherwise). unused: checkpoint tensors the model has no place for.
    """
    loaded: List[str]
    reinitialised: List[str]
    not_in_checkpoint: List[str]
    unused: List[str]


def load_finetune_checkpoint(model: nn.Module, path: str, cfg: Config, backbone_given: bool = False,
                             flownet_given: bool = False, say: Callable[[str], None] = _quiet) -> FinetuneReport:
    """Starts training from a full MMTracking/viddet checkpoint (mmcv ``load_checkpoint`` with
    ``strict=False``, as ``load_from`` does): every tensor of the same name and shape is loaded;
    the classifier ``fc_cls`` and box regressor ``fc_reg`` (the method's ``class_specific_prefixes``) keep mmdet's
    initialisation when the checkpoint's classes (``meta['CLASSES']``, or its class count) differ
    from ``cfg.model.classes``.

    Args:
        backbone_given, flownet_given: the backbone / FlowNet were initialised from their own
            weights before, so the checkpoint need not hold them.

    Raises:
        VidDetError: a checkpoint of another backbone, NaN weights, a mis-shaped tensor outside the
            class-dependent head, or a checkpoint without the backbone / FlowNet weights when they
            are not given otherwise (naming the init key to set).
    """
    state, meta = read_checkpoint(path)
    own = model.state_dict()
    if not any(k in own for k in state):   # a plain mmdet Faster R-CNN file (a YOLOX base loads as it is)
        state = with_detector_prefix(state)
    check_finite(state, path)
    kind = describe_state_dict(state)
    if kind[1] is not None and kind[1] != cfg.model.backbone:
        raise VidDetError(f'init.checkpoint {path} is {describe(*kind)}, but model.backbone is {cfg.model.backbone}')
    new_classes = list(cfg.model.classes)
    old_classes = list(class_names(meta)) if meta else None
    reinit = [k for k in own if k.startswith(model.class_specific_prefixes) and k in state
              and (tuple(state[k].shape) != tuple(own[k].shape)
                   or (old_classes is not None and old_classes != new_classes))]
    missing, unused = load_partial(model, state, f'init.checkpoint {path}', lambda k: None if k in reinit else k)
    unused = [k for k in unused if k not in reinit]
    absent = [k for k in missing if k not in reinit and not k.endswith('num_batches_tracked')]
    for prefix, given, key, advice in (
            ('detector.backbone.', backbone_given, 'init.backbone_weights', 'its ImageNet weights'),
            ('motion.', flownet_given or cfg.model.flownet == 'zero', 'init.flownet_weights', 'flownet_simple')):
        lacking = [k for k in absent if k.startswith(prefix)]
        if lacking and not given:
            raise VidDetError(f'init.checkpoint {path} has no weights for {prefix}* ({len(lacking)} tensors): set '
                              f'{key} ({advice}, a file, or {RANDOM_INIT})')
    loaded = [k for k in own if k not in missing]
    report = FinetuneReport(loaded, reinit, absent, unused)
    say(_finetune_message(path, report, old_classes, new_classes, own, state))
    return report


def _finetune_message(path, r: FinetuneReport, old_classes, new_classes, own, state) -> str:
    lines = [f'initial checkpoint {path}: loaded {len(r.loaded)} of {len(own)} tensors']
    if r.reinitialised:
        was = f'{len(old_classes)} classes ({_listed(old_classes, 4)})' if old_classes else 'other classes'
        shapes = [f'{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}' for k in r.reinitialised]
        lines.append(f're-initialised for the {len(new_classes)} classes of model.classes (the checkpoint has '
                     f'{was}): {", ".join(shapes)}')
    if r.not_in_checkpoint:
        lines.append(f'not in the checkpoint, initialised otherwise ({len(r.not_in_checkpoint)}): '
                     f'{_listed(r.not_in_checkpoint)}')
    if r.unused:
        lines.append(f'unused tensors of the checkpoint ({len(r.unused)}): {_listed(r.unused)}')
    return '\n  '.join(lines)
