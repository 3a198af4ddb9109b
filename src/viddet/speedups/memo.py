"""Results the fast paths compute once and reuse: keyed by a module's weights and by a tensor's
identity, so they can never be stale and go away with what they were computed from."""
from __future__ import annotations

from typing import Callable, Tuple, TypeVar

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar('T')


def weights_version(module: nn.Module) -> Tuple:
    """Changes whenever any parameter or buffer of ``module`` is replaced (``.to()``, new tensors)
    or modified in place (optimizer steps, ``load_state_dict``: tensor version counters)."""
    return tuple((id(t), t._version) for t in list(module.parameters()) + list(module.buffers()))


class TensorCache(WeakIdKeyDictionary):
    """Results keyed by a tensor's identity, each kept only as long as the tensor lives (a weak
    dictionary); a copy of a model starts with an empty one (its entries belong to the original's
    tensors)."""

    def __deepcopy__(self, memo) -> 'TensorCache':
        return TensorCache()


def per_tensor(cache: TensorCache, owner: nn.Module, tensor: torch.Tensor, compute: Callable[[], T]) -> T:
    """``compute()``, once per (``tensor``, weights of ``owner``): kept in ``cache`` (an attribute
    of the fast module ``owner``), so that the entry goes when ``tensor`` is freed (e.g. a
    reference frame leaving SELSA's set, a frame leaving FGFA's window)."""
    version = weights_version(owner)
    hit = cache.get(tensor)
    if hit is None or hit[0] != version:
        hit = (version, compute())
        cache[tensor] = hit
    return hit[1]
