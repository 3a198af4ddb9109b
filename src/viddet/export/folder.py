"""An export folder: ``export_model`` writes one ONNX graph per stage and ``model.json``;
``load_export`` reads it back as a method whose stages run on ONNX Runtime.

``model.json`` (the manifest)::

    {"format": "viddet-onnx", "version": 1, "method": "dff", "backbone": "r50",
     "classes": [...], "settings": {...the method's Settings...},
     "preprocessing": {"scale": [1000, 600], "mean_rgb": [...], "std_rgb": [...], "size_divisor": 16},
     "source": {"checkpoint": "dff.pth", "sha256": "..."}, "opset": 17, "exporter": "...",
     "stages": [{"kind": "features", "module": "detector",
                 "graphs": [{"name": "features", "file": "features.onnx", "sha256": "...",
                             "inputs": [{"name": "images", "shape": ["batch", 3, "height", "width"]}],
                             "outputs": [...]}]}, ...]}
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from viddet import speedups
from viddet.config.typed import method_settings
from viddet.data.transforms import DEFAULT_SCALE, IMG_MEAN_RGB, IMG_STD_RGB, SIZE_DIVISOR
from viddet.errors import VidDetError
from viddet.fileio import atomic_write_json, sha256_file
from viddet.methods import METHOD_NAMES, VIDMethod, method_class
from viddet.methods.base import MethodSettings
from viddet.models.backbones import backbone_of_state_dict
from viddet.runtime import cpu_kernels
from viddet.export.stages import FAST_STAND_INS, STAGE_KINDS, Graph, Examples, OrtStage, stages_of, uncovered_parameters

FORMAT, VERSION = 'viddet-onnx', 1
DEFAULT_OPSET = 17
MANIFEST = 'model.json'


def _onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise VidDetError(f'ONNX export needs onnx and onnxruntime ({e}): pip install "viddet[export]"') from None
    return onnx, onnxruntime


# ====================================================================================== export
def export_model(model: VIDMethod, out: Path, class_names, scale: Tuple[int, int] = DEFAULT_SCALE,
                 settings: Optional[MethodSettings] = None, source: Optional[Path] = None,
                 opset: int = DEFAULT_OPSET) -> dict:
    """Writes ``out/`` with one ONNX graph per stage of ``model`` (:mod:`viddet.export.stages`) and
    ``out/model.json``; returns the manifest.

    The plain modules are exported (fast modules are swapped back first, :func:`viddet.speedups.revert`)
    with ``torch.onnx.export`` (TorchScript tracing, ``dynamo=False``: the traced graphs keep the
    frame-size-dependent crops of FlowNet's decoder as dynamic slices), dynamic batch and image
    sizes; each graph passes ``onnx.checker``.

    Args:
        model: a VID method with its weights (eval mode is set).
        out: the folder (created; graphs and manifest of an earlier export there are replaced).
        class_names: label i -> name.
        scale: the resize limits (long, short) the model runs at, pixels.
        settings: the method's inference settings (default its ``Settings()``).
        source: the checkpoint file the weights came from (its path and SHA-256 go into the manifest).
        opset: ONNX opset, 13 to 20 (17 tested).

    Raises:
        VidDetError: a module with weights that no stage exports (a method viddet cannot export yet),
            onnx missing, or a graph that fails ``onnx.checker``.
    """
    if not 13 <= opset <= 20:
        raise VidDetError(f'--opset {opset}: the exporter writes opsets 13 to 20')
    onnx, _ = _onnx()
    model = speedups.revert(model).eval()
    stages = stages_of(model)
    uncovered = uncovered_parameters(model, stages)
    if uncovered:
        raise VidDetError(f'cannot export {type(model).__name__}: no ONNX stage holds its weights '
                          f'{", ".join(uncovered[:3])}{" ..." if len(uncovered) > 3 else ""} '
                          f'(exportable modules: {", ".join(s.plain.__name__ for s in STAGE_KINDS.values())})')
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings if settings is not None else type(model).Settings()
    entries = []
    with torch.no_grad():
        examples = Examples.of(model.detector)
        for path, stage in stages:
            graphs = [_export_graph(g, out, opset, onnx) for g in stage.graphs(model.get_submodule(path), examples)]
            entries.append({'kind': stage.kind, 'module': path, 'graphs': graphs})
    manifest = {
        'format': FORMAT, 'version': VERSION, 'method': type(model).name,
        'backbone': backbone_of_state_dict(model.state_dict()) or 'unknown',
        'classes': list(class_names), 'settings': settings.build_kwargs(),
        'preprocessing': {'scale': list(scale), 'mean_rgb': list(IMG_MEAN_RGB), 'std_rgb': list(IMG_STD_RGB),
                          'size_divisor': SIZE_DIVISOR},
        'source': {'checkpoint': None if source is None else str(source),
                   'sha256': None if source is None else sha256_file(Path(source))},
        'opset': opset, 'exporter': f'torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}',
        'stages': entries}
    atomic_write_json(out / MANIFEST, manifest, indent=1)
    return manifest


def _export_graph(g: Graph, out: Path, opset: int, onnx) -> Dict[str, Any]:
    file = out / f'{g.name}.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(g.module, g.example, str(file), input_names=g.inputs, output_names=g.outputs,
                          dynamic_axes=g.dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
    try:
        onnx.checker.check_model(str(file))
    except onnx.checker.ValidationError as e:
        raise VidDetError(f'{file}: the exported graph fails onnx.checker: {str(e).splitlines()[0]}') from None
    graph = onnx.load(str(file), load_external_data=False).graph

    def shapes(values):
        return [{'name': v.name, 'shape': [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]
    return {'name': g.name, 'file': file.name, 'sha256': sha256_file(file),
            'inputs': shapes(graph.input), 'outputs': shapes(graph.output)}


# ====================================================================================== loading
@dataclass
class ExportedModel:
    """What :func:`load_export` returns (the fields of ``viddet.checkpoints.loading.LoadedModel``)."""
    model: VIDMethod
    class_names: Tuple[str, ...]
    meta: dict
    path: Path
    scale: Tuple[int, int]
    test: MethodSettings


def is_export(path) -> bool:
    """Whether ``path`` is a folder (an export folder, or a broken one: :func:`load_export` says)."""
    return path is not None and Path(str(path)).is_dir()


def read_manifest(folder: Path) -> dict:
    """The checked manifest of an export folder.

    Raises:
        VidDetError: no / unreadable ``model.json``, not a viddet export, a field missing or of the
            wrong type (no class names, a resize scale that is not two positive integers).
    """
    file = folder / MANIFEST
    if not file.is_file():
        raise VidDetError(f'{folder}: no {MANIFEST}: not a viddet ONNX export (make one with '
                          f'viddet export CHECKPOINT --out DIR)')
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise VidDetError(f'{file}: not a readable manifest ({str(e).splitlines()[0]})') from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise VidDetError(f'{file}: not a viddet ONNX export manifest (format is not {FORMAT!r})')
    if manifest.get('version') != VERSION:
        raise VidDetError(f'{file}: export format version {manifest.get("version")!r}; this viddet reads {VERSION}')
    kinds = {'method': str, 'backbone': str, 'classes': list, 'settings': dict, 'stages': list, 'preprocessing': dict}
    for key, kind in kinds.items():
        if not isinstance(manifest.get(key), kind):
            raise VidDetError(f'{file}: field {key!r} is missing or not a {kind.__name__}')
    if manifest['method'] not in METHOD_NAMES:
        raise VidDetError(f'{file}: unknown method {manifest["method"]!r} (known: {", ".join(METHOD_NAMES)})')
    if not manifest['classes'] or not all(isinstance(c, str) for c in manifest['classes']):
        raise VidDetError(f'{file}: field \'classes\' must be a non-empty list of class names')
    scale = manifest['preprocessing'].get('scale')
    if not (isinstance(scale, list) and len(scale) == 2 and all(type(v) is int and v > 0 for v in scale)):
        raise VidDetError(f'{file}: preprocessing.scale must be [long side, short side] in pixels, got {scale!r}')
    return manifest


def load_export(folder, method: Optional[str] = None, backbone: Optional[str] = None,
                test: Optional[MethodSettings] = None, **settings) -> ExportedModel:
    """The method of an export folder with its stages on ONNX Runtime (CPU; CUDA / TensorRT
    providers first where installed): the method's skeleton is built from the manifest and each
    stage's plain module is swapped for its stand-in (:mod:`viddet.export.stages`), so that the
    method's ``predict`` and the streaming engine run unchanged. With ``fast`` (the default, as
    for a checkpoint) the weight-free steps run the PyTorch path's fast modules
    (``speedups.convert`` with :data:`viddet.export.stages.FAST_STAND_INS`).

    Args:
        folder: the export folder.
        method, backbone: if given, what the folder must hold.
        test, settings: inference settings, as for ``load_model`` (default: the manifest's;
            ``fast`` is not in it: True unless given).

    Raises:
        VidDetError: one line naming the folder or file: no / bad manifest, a method or backbone
            the folder does not hold, a missing graph, a graph whose SHA-256 differs from the
            manifest (changed or truncated), a graph ONNX Runtime cannot load or whose inputs or outputs
            (names, fixed sizes) differ from the manifest, a stage the method does not have, class
            names that do not fit the heads' scores, or onnxruntime missing.
    """
    folder = Path(str(folder))
    manifest = read_manifest(folder)
    if method is not None and method != manifest['method']:
        raise VidDetError(f'{folder} holds a {manifest["method"]} export, not {method}')
    if backbone is not None and backbone != manifest['backbone']:
        raise VidDetError(f'{folder} holds a {manifest["backbone"]} export, not {backbone}')
    cls = method_class(manifest['method'])
    cfg = test or method_settings(cls, manifest['settings'], f'{folder / MANIFEST}', 'settings')
    if settings:
        cfg = method_settings(cls, {**cfg.values(), **settings}, 'inference settings')
    _, ort = _onnx()
    model = cls.build(manifest['backbone'], len(manifest['classes']), **cfg.build_kwargs()).eval()
    for entry in manifest['stages']:
        _swap_stage(model, folder, entry, ort)
    left = [n for n, _ in model.named_parameters()]
    if left:
        raise VidDetError(f'{folder / MANIFEST}: no stage of the export holds {left[0]} '
                          f'({len(left)} weights uncovered): a stage is missing from the manifest')
    if cfg.fast:
        model = speedups.convert(model, cpu_kernels(), FAST_STAND_INS)
    _check_classes(manifest, folder)
    scale = manifest['preprocessing']['scale']
    return ExportedModel(model, tuple(manifest['classes']), {'export': manifest}, folder, (scale[0], scale[1]), cfg)


def _swap_stage(model: nn.Module, folder: Path, entry: dict, ort) -> None:
    where = f'{folder / MANIFEST}'
    try:
        stage, path = STAGE_KINDS[entry['kind']], entry['module']
        graphs = {g['name']: g for g in entry['graphs']}
        plain = model.get_submodule(path)
    except (KeyError, TypeError, AttributeError) as e:
        raise VidDetError(f'{where}: stage {entry.get("kind") if isinstance(entry, dict) else entry!r} does not '
                          f'fit a {model.title} model ({type(e).__name__}: {e})') from None
    if type(plain) is not stage.plain:
        raise VidDetError(f'{where}: stage {stage.kind} is for a {stage.plain.__name__}, but {path} of a '
                          f'{model.title} model is a {type(plain).__name__}')
    sessions = {name: OrtStage(_session(folder, g, ort), name) for name, g in graphs.items()}
    for target, module in stage.stand_ins(path, sessions, plain).items():
        model.set_submodule(target, module)


def _check_classes(manifest: dict, folder: Path) -> None:
    """The heads' class scores (``cls_score``: classes + background) fit the manifest's classes."""
    for s in manifest['stages']:
        for g in s['graphs']:
            for out in g['outputs']:
                if out['name'] == 'cls_score' and out['shape'][-1] != len(manifest['classes']) + 1:
                    raise VidDetError(f'{folder / g["file"]}: scores {out["shape"][-1]} classes (with background), '
                                      f'but {MANIFEST} lists {len(manifest["classes"])} classes')


def _session(folder: Path, graph: dict, ort):
    try:
        file, digest = folder / graph['file'], graph['sha256']
        inputs, outputs = _signature(graph['inputs']), _signature(graph['outputs'])
    except (KeyError, TypeError) as e:
        raise VidDetError(f'{folder / MANIFEST}: graph entry without {e}') from None
    if not file.is_file():
        raise VidDetError(f'{file}: graph missing from the export folder')
    if sha256_file(file) != digest:
        raise VidDetError(f'{file}: SHA-256 differs from {MANIFEST} (the graph was changed or truncated after export)')
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = [p for p in ('TensorrtExecutionProvider', 'CUDAExecutionProvider')
                 if p in ort.get_available_providers()] + ['CPUExecutionProvider']
    try:
        session = ort.InferenceSession(str(file), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise VidDetError(f'{file}: ONNX Runtime cannot load the graph ({str(e).splitlines()[0][:200]})') from None
    for kind, want, values in (('inputs', inputs, session.get_inputs()), ('outputs', outputs, session.get_outputs())):
        got = _signature([{'name': v.name, 'shape': v.shape} for v in values])
        if [n for n, _ in got] != [n for n, _ in want]:
            raise VidDetError(f'{file}: graph {kind} {[n for n, _ in got]} differ from the manifest\'s {[n for n, _ in want]}')
        if got != want:
            raise VidDetError(f'{file}: graph {kind} of sizes {[d for _, d in got]} differ from the manifest\'s '
                              f'{[d for _, d in want]}')
    return session


def _signature(values) -> List[Tuple[str, Tuple]]:
    """[(name, fixed sizes)] of a graph's inputs or outputs (dynamic axes as None)."""
    return [(v['name'], tuple(d if isinstance(d, int) and d > 0 else None for d in v['shape'])) for v in values]


def describe_stages(manifest: dict) -> List[str]:
    """One line per graph of a manifest: ``name: inputs -> outputs`` with their shapes."""
    def fmt(values):
        return ', '.join(f'{v["name"]}{tuple(v["shape"])}' for v in values)
    return [f'{g["name"]} ({s["kind"]} at {s["module"]}): {fmt(g["inputs"])} -> {fmt(g["outputs"])}'
            for s in manifest['stages'] for g in s['graphs']]
