"""The stages of a VID method that become ONNX graphs, and the ONNX Runtime modules that stand in
for them when an export runs.

A stage is a plain module of the model (or, for ``features``, two of them) whose learned
computation one or two graphs hold. :data:`STAGES` lists them by plain module type; each kind
knows the modules it replaces, how its graphs are traced (wrappers around the plain modules' own
methods, so that what is exported is what a reader of :mod:`viddet.models` sees) and which stand-in
module computes them from the graphs:

================  ==============================  ===========================================================
kind              plain module                    graph(s) (inputs -> outputs)        stand-in
================  ==============================  ===========================================================
``features``      ``FasterRCNN``: its backbone    ``features``: images -> feats;      ``backbone``:
                  and neck                        ``extract_feat``                    :class:`OrtStage`, ``neck``: Identity
``rpn``           ``RPNHead``                     ``rpn``: feats -> objectness,       :class:`OrtRPNHead`
                                                  deltas (``forward``)
``box_head``      ``BBoxHead``                    ``box_head``: roi_feats ->          :class:`OrtBBoxHead`
                                                  cls_score, bbox_pred
``selsa_head``    ``SelsaBBoxHead``               ``selsa_refs``: ref_roi_feats ->    :class:`OrtSelsaBBoxHead`
                                                  first_fc, key_i, value_i
                                                  (``ref_projections``);
                                                  ``selsa_head``: roi_feats, key_i,
                                                  value_i -> cls_score, bbox_pred
                                                  (``forward_cached``)
``flownet``       ``FlowNetSimple``               ``flownet``: pairs -> flow          :class:`OrtFlowNet`
                                                  (``forward_prepared``)
``aggregator``    ``EmbedAggregator``             ``aggregator``: feats,              :class:`OrtEmbedAggregator`
                                                  window_feats -> aggregated
``troi_embed``    ``TemporalRoIAlign``: its       ``troi_embed``: roi_feats ->        :class:`OrtStage`
                  ``embed_network``               embedded
================  ==============================  ===========================================================

Everything else (RoIAlign, anchors, proposal decoding, NMS, top-k, feature warping, FlowNet's
input preparation, Temporal RoI Align's most-similar search) has no weights and stays the PyTorch
code of the method: ``docs/deployment.md`` says why. As on the PyTorch path, ``test.fast`` (default)
runs its fast modules (``speedups.convert`` with :data:`FAST_STAND_INS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from viddet.models.aggregators import EmbedAggregator, SelsaBBoxHead, SelsaRefProjections
from viddet.models.detector import BBoxHead, FasterRCNN, RPNHead
from viddet.models.fast import FastModule, share_state
from viddet.models.flownet import FlowNetSimple
from viddet.models.temporal_roi_align import TemporalRoIAlign
from viddet.speedups.detector import EarlyStopNMS


class OrtStage(nn.Module):
    """One ONNX graph run by ONNX Runtime, as a module: ``forward(*tensors)`` feeds the graph's
    inputs in order and returns its output (one tensor) or outputs (a tuple), float32, on the device
    of the first input.

    Args:
        session: an ``onnxruntime.InferenceSession`` of the graph.
        name: the graph's name in the export (for messages and ``repr``).
    """

    def __init__(self, session, name: str):
        super().__init__()
        self.session, self.name = session, name
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def forward(self, *inputs: torch.Tensor):
        feeds = {n: t.detach().to('cpu', torch.float32).contiguous().numpy() for n, t in zip(self.input_names, inputs)}
        outs = [torch.from_numpy(o).to(inputs[0].device) for o in self.session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        return f'{self.name}: ({", ".join(self.input_names)}) -> ({", ".join(self.output_names)})'


class OrtModule:
    """Base of the stand-ins ``OrtX(OrtModule, X)``: an ``X`` whose learned layers are ONNX graphs.

    Built from a plain ``X`` like a fast module (:mod:`viddet.models.fast`): it takes over the
    plain module's attributes and buffers (anchors, normalisation constants, settings) but none of
    its parameters or submodules; the graphs (:class:`OrtStage`) become its children under the names
    given. It overrides the methods whose computation the graphs hold; the others are ``X``'s.
    """

    def __init__(self, plain: nn.Module, **graphs: OrtStage):
        base = next(c for c in type(self).__mro__[1:] if issubclass(c, nn.Module) and not issubclass(c, OrtModule))
        if type(plain) is not base:
            raise TypeError(f'{type(self).__name__} stands in for a {base.__name__}, got {type(plain).__name__}')
        share_state(self, plain)
        self._modules.clear()
        self._parameters.clear()
        for name, graph in graphs.items():
            self.add_module(name, graph)


class OrtRPNHead(OrtModule, RPNHead):
    """:class:`RPNHead` with its convs in the ``rpn`` graph (anchors, decoding, NMS: RPNHead's)."""

    def forward(self, x):
        return self.graph(x)


class FastOrtRPNHead(EarlyStopNMS, FastModule, OrtRPNHead):
    """:class:`OrtRPNHead` with the fast path's NMS (:class:`viddet.speedups.detector.EarlyStopNMS`:
    the same proposals), as ``FastRPNHead`` has it; :data:`FAST_STAND_INS`."""


FAST_STAND_INS: Dict[type, type] = {OrtRPNHead: FastOrtRPNHead}
"""The fast modules of the stand-ins, for ``speedups.convert(model, kernels, FAST_STAND_INS)`` on a
loaded export: the weight-free steps then run the PyTorch path's fast modules. The plain modules an
export keeps are converted by ``speedups.convert`` itself (``RoIHead``: NMS; ``SingleRoIExtractor``:
RoIAlign by gathers; ``TemporalRoIAlign``, whose ``embed_network`` is a graph: the re-associated
most-similar search, :meth:`viddet.speedups.troi.FastTemporalRoIAlign.reassociated`). The other
stand-ins' fast modules would re-associate their learned layers, which are in the graphs."""


class OrtBBoxHead(OrtModule, BBoxHead):
    """:class:`BBoxHead` computed by the ``box_head`` graph."""

    def forward(self, x):
        return self.graph(x)


class OrtSelsaBBoxHead(OrtModule, SelsaBBoxHead):
    """:class:`SelsaBBoxHead` computed by two graphs: ``refs`` (:meth:`ref_projections`) and
    ``head`` (:meth:`forward_cached`); SELSA's reference memory keeps the projections as before."""

    def ref_projections(self, ref_x: torch.Tensor, return_first_fc: bool = False):
        first, *kv = self.refs(ref_x)
        projections = [SelsaRefProjections(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]
        return (projections, first) if return_first_fc else projections

    def forward_cached(self, x, ref_kv: Sequence[SelsaRefProjections], first_fc=None):
        """``first_fc`` is not needed: the graph computes the first fc itself (the same values)."""
        return self.head(x, *[t for p in ref_kv for t in (p.key, p.value)])

    def forward(self, x, ref_x):
        return self.forward_cached(x, self.ref_projections(ref_x))


class OrtFlowNet(OrtModule, FlowNetSimple):
    """:class:`FlowNetSimple` whose network (:meth:`forward_prepared`) is the ``flownet`` graph;
    input preparation and resizing the flow to the feature grid stay FlowNetSimple's."""

    def forward_prepared(self, x):
        return self.graph(x)


class OrtEmbedAggregator(OrtModule, EmbedAggregator):
    """:class:`EmbedAggregator` whose :meth:`forward` (embedding, weights, weighted sum) is the
    ``aggregator`` graph; FGFA's window and warping stay the method's."""

    def forward(self, x, ref_x):
        return self.graph(x, ref_x)


# ============================================================================ tracing wrappers
class _Traced(nn.Module):
    """``forward`` = ``method`` (a bound method of ``owner``, e.g. ``detector.extract_feat``), so that
    the tracer sees the plain method and ``owner``'s weights are this module's."""

    def __init__(self, owner: nn.Module, method: Callable):
        super().__init__()
        self.owner, self.method = owner, method

    def forward(self, *inputs):
        return self.method(*inputs)


class _SelsaRefs(nn.Module):
    def __init__(self, head: SelsaBBoxHead):
        super().__init__()
        self.head = head

    def forward(self, ref_roi_feats):
        kv, first = self.head.ref_projections(ref_roi_feats, return_first_fc=True)
        return (first, *[t for p in kv for t in (p.key, p.value)])


class _SelsaHead(nn.Module):
    def __init__(self, head: SelsaBBoxHead):
        super().__init__()
        self.head = head

    def forward(self, roi_feats, *kv):
        return self.head.forward_cached(roi_feats, [SelsaRefProjections(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)])


# ============================================================================ the stage table
@dataclass
class Graph:
    """How one graph is traced: the module to trace, its example inputs, input / output names and
    their dynamic axes ({name: {axis: symbolic name}})."""
    name: str
    module: nn.Module
    example: Tuple[torch.Tensor, ...]
    inputs: List[str]
    outputs: List[str]
    dynamic: Dict[str, Dict[int, str]]


@dataclass
class Examples:
    """Example tensors of one small frame, traced through the plain model (every graph is traced
    on the real shapes of its inputs).

    ``images`` (1, 3, 144, 144): a 144-pixel side makes FlowNet's decoder crop at every level where
    a 16-aligned input can need it, so that the traced graph crops for every frame size."""
    images: torch.Tensor
    feats: torch.Tensor
    roi_feats: torch.Tensor

    @staticmethod
    def of(detector: FasterRCNN) -> 'Examples':
        g = torch.Generator().manual_seed(0)
        images = torch.randn(1, 3, 144, 144, generator=g)
        feats = detector.extract_feat(images)
        xy = torch.rand(6, 2, generator=g) * 80
        rois = torch.cat([torch.zeros(6, 1), xy, xy + 8 + torch.rand(6, 2, generator=g) * 56], 1)
        return Examples(images, feats, detector.roi_head.roi_align(feats, rois))


IMG = {0: 'batch', 2: 'height', 3: 'width'}
FEAT = {0: 'batch', 2: 'feat_height', 3: 'feat_width'}
ROIS = {0: 'rois'}


def _features(m: FasterRCNN, ex: Examples) -> List[Graph]:
    return [Graph('features', _Traced(m, m.extract_feat), (ex.images,), ['images'], ['feats'], {'images': IMG, 'feats': FEAT})]


def _rpn(m: RPNHead, ex: Examples) -> List[Graph]:
    return [Graph('rpn', m, (ex.feats,), ['feats'], ['objectness', 'deltas'],
                  {'feats': FEAT, 'objectness': FEAT, 'deltas': FEAT})]


def _box_head(m: BBoxHead, ex: Examples) -> List[Graph]:
    return [Graph('box_head', m, (ex.roi_feats,), ['roi_feats'], ['cls_score', 'bbox_pred'],
                  {'roi_feats': ROIS, 'cls_score': ROIS, 'bbox_pred': ROIS})]


def _selsa_head(m: SelsaBBoxHead, ex: Examples) -> List[Graph]:
    kv = [f'{w}_{i}' for i in range(len(m.shared_fcs)) for w in ('key', 'value')]
    refs = {n: {0: 'ref_rois'} for n in ['ref_roi_feats', 'first_fc'] + kv}
    projections = _SelsaRefs(m)(ex.roi_feats)[1:]
    return [Graph('selsa_refs', _SelsaRefs(m), (ex.roi_feats,), ['ref_roi_feats'], ['first_fc'] + kv, refs),
            Graph('selsa_head', _SelsaHead(m), (ex.roi_feats[:4], *projections), ['roi_feats'] + kv,
                  ['cls_score', 'bbox_pred'],
                  {'roi_feats': ROIS, 'cls_score': ROIS, 'bbox_pred': ROIS, **{n: {0: 'ref_rois'} for n in kv}})]


def _flownet(m: FlowNetSimple, ex: Examples) -> List[Graph]:
    pairs = m.prepare_inputs(ex.images, torch.cat([ex.images.flip(3), ex.images]), ex.images.shape[-2:])
    return [Graph('flownet', _Traced(m, m.forward_prepared), (pairs,), ['pairs'], ['flow'],
                  {'pairs': {0: 'pairs', 2: 'half_height', 3: 'half_width'},
                   'flow': {0: 'pairs', 2: 'flow_height', 3: 'flow_width'}})]


def _aggregator(m: EmbedAggregator, ex: Examples) -> List[Graph]:
    window = torch.cat([ex.feats, ex.feats.flip(3), ex.feats.flip(2)])
    return [Graph('aggregator', m, (ex.feats, window), ['feats', 'window_feats'], ['aggregated'],
                  {'feats': {2: 'feat_height', 3: 'feat_width'}, 'aggregated': {2: 'feat_height', 3: 'feat_width'},
                   'window_feats': {0: 'window', 2: 'feat_height', 3: 'feat_width'}})]


def _troi_embed(m: TemporalRoIAlign, ex: Examples) -> List[Graph]:
    return [Graph('troi_embed', m.embed_network, (ex.roi_feats,), ['roi_feats'], ['embedded'],
                  {'roi_feats': {0: 'maps'}, 'embedded': {0: 'maps'}})]


def _swap_features(path: str, g: Dict[str, OrtStage]) -> Dict[str, nn.Module]:
    return {f'{path}.backbone': g['features'], f'{path}.neck': nn.Identity()}


def _swap(cls) -> Callable:
    def swap(path: str, g: Dict[str, OrtStage], plain: nn.Module) -> Dict[str, nn.Module]:
        return {path: cls(plain, graph=next(iter(g.values())))}
    return swap


@dataclass(frozen=True)
class Stage:
    """A kind of stage: the plain module type it exports (exact), its graphs and its stand-ins.

    Attributes:
        kind: its name in ``model.json``.
        plain: the plain module class.
        graphs: (module, examples) -> the graphs to trace.
        stand_ins: (module path, {graph name: OrtStage}, plain module) -> {path: module to put there}.
        replaces: the paths (below the stage's module) whose parameters its graphs hold ('' itself).
    """
    kind: str
    plain: type
    graphs: Callable
    stand_ins: Callable
    replaces: Tuple[str, ...] = ('',)


STAGES: Tuple[Stage, ...] = (
    Stage('features', FasterRCNN, _features, lambda p, g, m: _swap_features(p, g), ('backbone', 'neck')),
    Stage('rpn', RPNHead, _rpn, _swap(OrtRPNHead)),
    Stage('box_head', BBoxHead, _box_head, _swap(OrtBBoxHead)),
    Stage('selsa_head', SelsaBBoxHead, _selsa_head,
          lambda p, g, m: {p: OrtSelsaBBoxHead(m, refs=g['selsa_refs'], head=g['selsa_head'])}),
    Stage('flownet', FlowNetSimple, _flownet, _swap(OrtFlowNet)),
    Stage('aggregator', EmbedAggregator, _aggregator, _swap(OrtEmbedAggregator)),
    Stage('troi_embed', TemporalRoIAlign, _troi_embed,
          lambda p, g, m: {f'{p}.embed_network': g['troi_embed']}, ('embed_network',)),
)
"""The stage kinds, by the exact type of their plain module."""

STAGE_KINDS: Dict[str, Stage] = {s.kind: s for s in STAGES}


def stages_of(model: nn.Module) -> List[Tuple[str, Stage]]:
    """(module path, stage kind) of every stage of a plain model, in module order.

    A module whose learned parameters no stage covers cannot be exported: the caller checks
    that with :func:`uncovered_parameters`.
    """
    by_type = {s.plain: s for s in STAGES}
    return [(path, by_type[type(m)]) for path, m in model.named_modules() if type(m) in by_type]


def uncovered_parameters(model: nn.Module, stages: Sequence[Tuple[str, Stage]]) -> List[str]:
    """Parameter names of ``model`` that no graph of ``stages`` holds."""
    covered = [f'{path}.{r}.' if r else f'{path}.' for path, s in stages for r in s.replaces]
    return [n for n, _ in model.named_parameters() if not any(n.startswith(c) for c in covered)]
