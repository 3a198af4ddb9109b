"""Interrupts: SIGTERM (what a cluster scheduler or ``kill`` sends) handled exactly like Ctrl-C
(SIGINT), for every command.

:func:`handle_interrupts` turns both signals into :class:`Interrupted` (a ``KeyboardInterrupt``, so
every ``except KeyboardInterrupt`` that keeps partial results handles both), which remembers the
signal: the CLI exits with the conventional status ``128 + signal`` (130 for SIGINT, 143 for SIGTERM,
:func:`exit_status`). Inside :func:`deferred` (the trainer's optimizer step and checkpoint save) a
first signal only sets a flag (:func:`pending`), so that the step finishes and the run saves a
checkpoint before it stops; a second signal interrupts at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_state = {'deferred': 0, 'pending': None}


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM.

    Args:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        message: what the run kept and how to continue (default: ``"interrupted (SIGINT)"``).
    """

    def __init__(self, signum: int = signal.SIGINT, message: Optional[str] = None):
        self.signum = int(signum)
        super().__init__(message or f'interrupted ({signal.Signals(self.signum).name})')


def signal_of(exc: BaseException) -> int:
    """The signal behind an interrupt: ``exc.signum`` of :class:`Interrupted`, SIGINT for a plain
    ``KeyboardInterrupt``."""
    return getattr(exc, 'signum', signal.SIGINT)


def exit_status(exc: BaseException) -> int:
    """The conventional exit status of a process stopped by a signal: 128 + its number (130 SIGINT,
    143 SIGTERM)."""
    return 128 + signal_of(exc)


def describe(exc: BaseException) -> str:
    """One line (or a few) for an interrupt: the message of :class:`Interrupted`, else ``interrupted``."""
    return str(exc) or f'interrupted ({signal.Signals(signal_of(exc)).name})'


def _handler(signum, frame):
    if _state['deferred'] and _state['pending'] is None:
        _state['pending'] = signum
        os.write(2, f'\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint '
                    f'(send it again to stop at once)\n'.encode())
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise :class:`Interrupted` (or, inside :func:`deferred`,
    set :func:`pending`); the previous handlers come back after it. Outside the main thread (where
    Python cannot install handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred(on: bool = True) -> Iterator[None]:
    """Within the block a first SIGINT / SIGTERM is remembered (:func:`pending`) instead of raised
    (under :func:`handle_interrupts`); ``on=False``: raised at once again (e.g. an evaluation inside
    a deferred training loop)."""
    before = _state['deferred']
    _state['deferred'] = before + 1 if on else 0
    try:
        yield
    finally:
        _state['deferred'] = before


def pending() -> Optional[int]:
    """The signal received inside :func:`deferred` and not yet acted on (None: none)."""
    return _state['pending']


def clear_pending() -> Optional[int]:
    """Forgets the pending signal; returns it."""
    signum, _state['pending'] = _state['pending'], None
    return signum
