"""One run per output location: an OS-level lock (``fcntl.flock``) on a lock file there, which the
operating system releases when the process ends however it ends (a kill -9 included), so a stale
lock file never blocks a later run.

* a folder (``viddet train``'s work dir, ``viddet test``'s ``--out-dir``): ``<folder>/.viddet.lock``
  (:data:`DIR_LOCK`);
* a file (``viddet demo``'s ``--out`` / ``--json``): ``<file>.lock`` beside it.

The lock file holds the pid and command of the run that holds it, for the message that refuses a
second run; it is removed when the run ends. Locks are re-entrant within one process (the CLI and the
function it calls may both take the same one).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional

from viddet.errors import VidDetError

DIR_LOCK = '.viddet.lock'

_held: Dict[str, int] = {}   # lock file (real path) -> times taken by this process


def lock_file_of(location, is_dir: bool) -> Path:
    """The lock file of an output folder (``is_dir``) or file."""
    location = Path(location)
    return location / DIR_LOCK if is_dir else location.with_name(location.name + '.lock')


def _holder(lock_file: Path) -> str:
    try:
        text = lock_file.read_text().strip()
    except OSError:
        text = ''
    return text.splitlines()[0] if text else 'another process'


def _acquire(lock_file: Path, label: str) -> Optional[int]:
    """Opens and locks ``lock_file``; returns its descriptor (a file replaced meanwhile is retried)."""
    import fcntl
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise VidDetError(f'{label}: cannot create the lock file {lock_file} '
                              f'({e.strerror or e}); is the location writable?') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise VidDetError(f'{label} is in use by another viddet run ({_holder(lock_file)}): wait for it to '
                              f'end, or give another {label.split()[0]}') from None
        try:   # the holder before us may have removed the file after we opened it: lock the current one
            if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def output_lock(location, label: str, is_dir: bool) -> Iterator[Path]:
    """Holds the lock of an output location for the block (a folder is created if needed, and
    removed again if the run left it empty).

    Args:
        location: the output folder (``is_dir``) or file.
        label: how messages name it, option first, e.g. ``'--work-dir work_dirs/x'``.
        is_dir: a folder (lock file inside it) or a file (lock file beside it).

    Yields:
        the lock file.

    Raises:
        VidDetError: another process holds the lock (naming its pid and command), or the lock file
            cannot be created (a file where the folder should be, an unwritable folder).
    """
    location = Path(location)
    created = is_dir and not location.exists()
    if is_dir:
        if location.exists() and not location.is_dir():
            raise VidDetError(f'{label} is a file, not a folder')
        try:
            location.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VidDetError(f'{label}: cannot create the folder ({e.strerror or e})') from None
    lock_file = lock_file_of(location, is_dir)
    key = os.path.realpath(lock_file)
    if key in _held:
        _held[key] += 1
        try:
            yield lock_file
        finally:
            _held[key] -= 1
        return
    fd = _acquire(lock_file, label)
    _held[key] = 1
    try:
        os.ftruncate(fd, 0)
        program = os.path.basename(sys.argv[0] or 'python').replace('__main__.py', 'viddet')
        command = ' '.join([program] + sys.argv[1:])
        os.write(fd, f'pid {os.getpid()}: {command}\n'.encode())
        yield lock_file
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)
        if created:   # a folder made for a run that wrote nothing is not left behind
            with contextlib.suppress(OSError):
                location.rmdir()
