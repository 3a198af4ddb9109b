"""The VID methods, one module each: per-frame algorithm, caches, test forward.

``build_method(name, backbone)`` constructs one by its short name (single, dff, fgfa, selsa, troi).
"""
from __future__ import annotations

from torch import nn

METHODS = ('single', 'dff', 'fgfa', 'selsa', 'troi')


def build_method(method: str, backbone: str = 'r50', num_classes: int = 30, **kwargs) -> nn.Module:
    """A method module by name. ``kwargs`` go to its constructor (e.g. ``key_frame_interval`` for
    DFF, ``ref_cache`` for SELSA/TRoI, ``num_shared_fcs`` for single).

    Raises:
        ValueError: unknown method.
    """
    if method == 'single':
        from viddet.methods.single import SingleFrame
        return SingleFrame(backbone, num_classes, **kwargs)
    if method == 'dff':
        from viddet.methods.dff import DFF
        return DFF(backbone, num_classes, **kwargs)
    if method == 'fgfa':
        from viddet.methods.fgfa import FGFA
        return FGFA(backbone, num_classes, **kwargs)
    if method == 'selsa':
        from viddet.methods.selsa import SELSA
        return SELSA(backbone, num_classes, **kwargs)
    if method == 'troi':
        from viddet.methods.selsa import SELSA
        return SELSA(backbone, num_classes, num_shared_fcs=3, temporal_roi_align=True, **kwargs)
    raise ValueError(f'unknown method {method!r}: choose one of {", ".join(METHODS)}')
