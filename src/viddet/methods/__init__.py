"""The VID methods, one file each, and the one table of them every other module reads.

Each method is a :class:`viddet.methods.base.VIDMethod` subclass that declares its facts (name,
checkpoint signature, settings, ...) and computes a frame's detections (``predict``) and a sample's
training losses (``losses``).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Tuple, Type

from viddet.errors import VidDetError
from viddet.methods.base import VIDMethod
from viddet.methods.dff import DFF
from viddet.methods.fgfa import FGFA
from viddet.methods.selsa import SELSA
from viddet.methods.single import SingleFrame
from viddet.methods.troi import TRoI
from viddet.methods.yolov import YOLOV, YOLOVPP

METHODS: Tuple[Type[VIDMethod], ...] = (SingleFrame, DFF, FGFA, SELSA, TRoI, YOLOV, YOLOVPP)
"""Every VID method viddet implements, in the order the CLI lists them."""

METHOD_NAMES: Tuple[str, ...] = tuple(m.name for m in METHODS)


def method_class(name: str) -> Type[VIDMethod]:
    """The method class of a short name (``single``, ``dff``, ``fgfa``, ``selsa``, ``troi``).

    Raises:
        VidDetError: unknown name (listing the known ones).
    """
    found = [m for m in METHODS if m.name == name]
    if not found:
        raise VidDetError(f'unknown method {name!r}: choose one of {", ".join(METHOD_NAMES)}')
    return found[0]


def method_of_keys(keys: Iterable[str]) -> Optional[Type[VIDMethod]]:
    """The method whose checkpoints have these state-dict keys: the most specific method (most
    ``signature`` prefixes) all of whose prefixes occur (e.g. ``SingleFrame`` for a bare Faster
    R-CNN, ``detector.backbone.*``); None when no method's signature matches. Methods with an empty
    signature are recognised only by the ``method`` their checkpoints' meta names."""
    keys = list(keys)
    matching = [m for m in METHODS if m.signature and all(any(k.startswith(p) for k in keys) for p in m.signature)]
    return max(matching, key=lambda m: len(m.signature)) if matching else None


def method_of_checkpoint(keys: Iterable[str], meta: Mapping) -> Optional[Type[VIDMethod]]:
    """The method a checkpoint holds: the ``method`` its meta names (viddet writes it), else the one
    its keys show (:func:`method_of_keys`: MMTracking and mmdet files); None when neither tells.

    Raises:
        VidDetError: the meta names a method this viddet does not know.
    """
    name = meta.get('method') if isinstance(meta, Mapping) else None
    if isinstance(name, str) and name:
        try:
            return method_class(name)
        except VidDetError:
            raise VidDetError(f'the checkpoint holds a {name!r} model, a method this viddet does not know '
                              f'(it knows {", ".join(METHOD_NAMES)}): a newer viddet or a plug-in?') from None
    return method_of_keys(keys)


def build_method(name: str, backbone: str = 'r50', num_classes: int = 30, **settings) -> VIDMethod:
    """A new, randomly initialised model: ``method_class(name).build(backbone, num_classes, **settings)``.

    Raises:
        VidDetError: unknown method or backbone.
        TypeError: a setting the method does not have.
    """
    return method_class(name).build(backbone, num_classes, **settings)


__all__ = ['METHODS', 'METHOD_NAMES', 'VIDMethod', 'SingleFrame', 'DFF', 'FGFA', 'SELSA', 'TRoI',
           'method_class', 'method_of_keys', 'method_of_checkpoint', 'build_method']
