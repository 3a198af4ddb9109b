"""The protocol of a fast module: an equivalent, faster computation of a plain module, for inference.

The plain modules of :mod:`viddet.models` and :mod:`viddet.methods` are the readable reference of
the papers (and what training runs). A fast module ``FastX`` is a subclass of a plain module ``X``
that overrides some of its methods with a faster computation of the same values (up to float
rounding), and calls the plain method (``super()``) wherever the fast one does not apply (autograd
on, training mode, another device or dtype, a configuration it does not cover)::

    class FastX(FastModule, X):
        fast_attributes = ('cache',)          # what FastX adds to X's attributes

        def __init__(self, plain: X, kernels: CpuKernels):
            super().__init__(plain, kernels)   # takes over plain's parameters, buffers, submodules
            self.cache = {}

        def forward(self, x):
            if torch.is_grad_enabled():
                return super().forward(x)      # X.forward
            ...

* ``FastX(plain, kernels)`` builds it from a plain ``X`` instance: it holds ``plain``'s parameters,
  buffers, submodules and attributes (the same tensors and child modules, not copies), so its
  state dict has the same keys and values and checkpoints load unchanged. ``plain`` itself is left
  as it was. ``kernels`` (:class:`viddet.runtime.CpuKernels`) is the CPU kernel choice, kept as
  ``self.kernels``; the fast module's caches are ordinary attributes, named in
  ``fast_attributes``.
* ``fast.to_plain()`` gives back a plain ``X`` with the same state and without those attributes.

:func:`viddet.speedups.convert` swaps the fast modules into a model (its built-in ones and those a
method declares in :attr:`viddet.methods.base.VIDMethod.fast_modules`), and
:func:`viddet.speedups.revert` swaps the plain ones back.
"""
from __future__ import annotations

from typing import ClassVar, Iterable, Tuple

from torch import nn

from viddet.runtime import CpuKernels

__all__ = ['FastModule', 'share_state']


def share_state(target: nn.Module, source: nn.Module, drop: Iterable[str] = ()) -> None:
    """Gives ``target`` (a new, uninitialised module) every attribute of ``source`` but those named
    in ``drop``: the same parameters, buffers, submodules, hooks and plain attributes, in containers
    of its own (so that replacing a child of one does not replace it in the other)."""
    drop = set(drop)
    for key, value in vars(source).items():
        if key not in drop:
            target.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value


class FastModule:
    """Base of the fast modules ``FastX(FastModule, X)`` (see the module docstring).

    Args:
        plain: the ``X`` instance to take the parameters, buffers and submodules of.
        kernels: the CPU kernels to run (:func:`viddet.runtime.cpu_kernels`).

    Attributes:
        kernels: the CPU kernel choice (:class:`viddet.runtime.CpuKernels`).
        fast_attributes: the names of the attributes the fast class adds (its caches), which
            :meth:`to_plain` leaves out.
    """

    fast_attributes: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, plain: nn.Module, kernels: CpuKernels):
        # X.__init__ would build new layers: the fast module takes over plain's instead
        if type(plain) is not self.plain_class():
            raise TypeError(f'{type(self).__name__} is built from a plain {self.plain_class().__name__}, '
                            f'got {type(plain).__name__}')
        share_state(self, plain)
        self.kernels = kernels

    @classmethod
    def plain_class(cls) -> type:
        """``X``: the first base class that is a module and not a fast module."""
        return next(c for c in cls.__mro__[1:] if issubclass(c, nn.Module) and not issubclass(c, FastModule))

    def to_plain(self) -> nn.Module:
        """A plain ``X`` holding this module's parameters, buffers, submodules and attributes,
        without ``kernels`` and the ``fast_attributes``."""
        plain = self.plain_class().__new__(self.plain_class())
        share_state(plain, self, drop=('kernels',) + tuple(self.fast_attributes))
        return plain
