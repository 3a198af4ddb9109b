"""ONNX export of the VID methods and running an export with ONNX Runtime (``docs/deployment.md``).

A video method is not one graph: each stage with weights (backbone + neck, RPN head, box head or
SELSA's attention head, FlowNet, FGFA's aggregator, Temporal RoI Align's embedding) is one ONNX graph
(:mod:`viddet.export.stages`), and the method's own code (key frames, FGFA's window, SELSA's
reference memory) and the weight-free selection steps (anchors, NMS, RoIAlign, top-k, warping) stay
the PyTorch code that runs in both paths, with the same fast modules (``speedups.convert``) unless
``test.fast`` is off. :func:`export_model` writes a folder of graphs and
a ``model.json`` manifest (:mod:`viddet.export.folder`); :func:`load_export` builds the method from
the manifest with ONNX Runtime modules standing in for those stages; ``load_model(FOLDER)``,
``VideoDetector.from_checkpoint(FOLDER)`` and ``--checkpoint FOLDER`` call it.

Needs the ``export`` extra: ``pip install "viddet[export]"`` (onnx, onnxruntime, onnxscript).
"""
from viddet.export.folder import ExportedModel, export_model, is_export, load_export, read_manifest

__all__ = ['export_model', 'load_export', 'is_export', 'read_manifest', 'ExportedModel']
