"""Training configuration: typed dataclasses loaded from YAML, with dotted command-line overrides.

A config file has up to five sections, ``model``, ``data``, ``schedule``, ``init`` and
``eval`` (see ``configs/selsa_r50.yaml`` for a complete, commented example), and may start from
another file (``base:``, see :func:`load_config`). Loading:

1. the YAML is read into plain dicts/lists;
2. each ``--set key.sub=value`` override is applied (the value is parsed as YAML, so ``3``,
   ``0.02``, ``true``, ``null``, ``[2, 5]`` get their types; list items are addressed by index,
   ``data.train.0.ann_file=...``);
3. the result is converted into :class:`Config`, checking every key and type: unknown keys (with a
   "did you mean" hint), wrong types and out-of-range values raise :class:`viddet.VidDetError`
   naming the file and the dotted key;
4. :meth:`Config.check_paths` verifies that the annotation files, image folders and init weights
   exist — the trainer calls it before building anything, so a typo fails in a second instead of
   after the model is built.

Defaults reproduce MMTracking's ImageNet VID recipe (MMTracking 0.14
``configs/vid/selsa/selsa_faster_rcnn_r50_dc5_1x_imagenetvid.py``): SGD lr 0.01 for a total batch
of 8 key images (scaled linearly with the actual total batch), momentum 0.9, weight decay 1e-4,
linear warm-up over 500 iterations from lr/3, x0.1 at the starts of epochs 3 and 6 (mmdet
``step=[2, 5]``), 7 epochs, gradient clipping at L2 norm 35.

Relative paths are relative to the current working directory (run ``viddet train`` from the
repository root, as MMTracking's ``data/ILSVRC/...`` paths assume).

The modules, one job each: :mod:`viddet.config.training` (the sections as dataclasses,
:func:`~viddet.config.training.load_config`), :mod:`viddet.config.files` (YAML with bases and
``--set`` overrides), :mod:`viddet.config.typed` (the checked conversion of plain values into
dataclasses, also of a method's inference settings) and :mod:`viddet.config.validate` (the checks
across fields).
"""
