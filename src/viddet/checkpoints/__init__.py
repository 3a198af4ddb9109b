"""From a checkpoint to a model ready to run: MMTracking 0.x/1.x files, plain mmdet Faster R-CNN
files, viddet's own files, and the MMTracking model zoo (names -> URL -> verified download into a
local cache).

MMTracking saves ``{"state_dict": ..., "meta": {"CLASSES": ...}}`` (mmcv ``save_checkpoint``); keys
are ``detector.*`` (+ ``motion.*`` for DFF/FGFA, ``aggregator.*`` for FGFA). viddet modules use the
same attribute names, so a file loads with ``strict=True`` and no renaming. :func:`load_model` is the
one way every command and the Python API turn a checkpoint into a model; :func:`load_partial` the one
way weights are loaded into part of a model (ImageNet backbones, fine-tuning).

The modules, one job each: :mod:`viddet.checkpoints.zoo` (the model zoo and the initial weights by
name), :mod:`viddet.checkpoints.download` (URLs and names -> verified files in the local cache),
:mod:`viddet.checkpoints.reading` (a file -> its tensors and meta, what they are) and
:mod:`viddet.checkpoints.loading` (tensors -> a model: :func:`~viddet.checkpoints.loading.load_model`).
"""
