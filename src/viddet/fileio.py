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
        OSError: if the folder cannot be created or written (its ``filename`` is ``path`` when the
            system gave none, as for a full disk).
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
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None:   # a failed write (a full disk) names no file
            e.filename = str(path)
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


def read_json(path: PathLike, what: str = 'file') -> Any:
    """Loads a JSON file, turning every way it can fail into one clear message.

    Args:
        path: the file; error messages show it as given.
        what: what the file is, for the messages (e.g. 'annotation file').

    Raises:
        VidDetError: ``<path>: <what> not found``, ``<path>: <what> is a folder, not a file``,
            ``<path>: not a text file ...`` (binary), ``<path>: not valid JSON (<problem> at line L
            column C)`` or ``<path>: cannot read <what> (<OS error>)``.
    """
    p = Path(path)
    if p.is_dir():
        raise VidDetError(f'{path}: {what} is a folder, not a file')
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise VidDetError(f'{path}: {what} not found') from None
    except OSError as e:
        raise VidDetError(f'{path}: cannot read {what} ({e})') from None
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError:
        raise VidDetError(f'{path}: not a text file, so not a JSON {what} (is it the right file?)') from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise VidDetError(f'{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})') from None


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (any Python >= 3.9).

    Raises:
        OSError: the file cannot be read.
    """
    import hashlib
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()
