"""Reading and writing files: atomic writers (a temporary name in the target folder, then
``os.replace``) and a JSON reader with clear errors.

A reader (or a crash) never sees a half-written output: either the old file or the complete new
one exists under the final name. Files get the permissions any new file gets under the process's
umask (``0666 & ~umask``), not the 0600 of a temporary file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

from viddet.errors import VidDetError

PathLike = Union[str, os.PathLike]


def new_file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file: ``0o666`` minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically, creating parent folders.

    Returns:
        The final path.

    Raises:
        OSError: if the folder cannot be created or written (propagated unchanged).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=str(path.parent))
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Writes UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path: PathLike, obj: Any, indent=None) -> Path:
    """Serialises ``obj`` with :func:`json.dumps` and writes it atomically.

    The default separators (``', '``, ``': '``) match ``mmcv.dump``/``json.dump``.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def read_json(path: PathLike, what: str = 'JSON file') -> Any:
    """Parses a JSON file, turning every way it can fail into one clear message.

    Args:
        path: the file.
        what: what the file is meant to be, for the message (e.g. ``'annotation file'``).

    Raises:
        VidDetError: the file is missing, a folder, unreadable, binary (not UTF-8 text) or not
            valid JSON (with the line and column of the first error).
    """
    p = Path(path)
    if not p.exists():
        raise VidDetError(f'{what} {p} does not exist')
    if p.is_dir():
        raise VidDetError(f'{what} {p} is a folder, not a file')
    try:
        text = p.read_bytes().decode('utf-8')
    except OSError as e:
        raise VidDetError(f'cannot read {what} {p}: {e.strerror}') from None
    except UnicodeDecodeError:
        raise VidDetError(f'{what} {p} is not a text file (not UTF-8): is it the right file?') from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise VidDetError(f'{what} {p} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}') from None
