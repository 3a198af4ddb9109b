"""Checking a run's output files before the work starts: :func:`check_output_path` (one file can be
written there), :func:`check_output_dir` (files can be written into a folder),
:func:`check_output_options` (a command's output options) and :func:`check_outputs` (every output of
a run, none overwriting an input or another output); :func:`write_failures_reported` (a write that
fails during the run as one line); :func:`partial_name`, where the writers of
:mod:`viddet.data.writers` keep an unfinished result."""
from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from viddet.errors import VidDetError


def partial_name(path) -> Path:
    """Where a writer keeps an unfinished result: ``out.mp4`` -> ``out.partial.mp4``."""
    path = Path(path)
    return path.with_name(f'{path.stem}.partial{path.suffix}')


def os_error_reason(e: OSError) -> str:
    """The reason an OSError gives, for messages (``strerror``, else its text, else its type)."""
    return e.strerror or str(e) or type(e).__name__


def check_output_path(path, label: Optional[str] = None, make_folder: bool = False) -> Path:
    """Checks that a file can be written at ``path``: its folder exists, is a folder and accepts new
    files (tried by creating and removing a hidden file, which also catches read-only file systems
    and ``/proc``), and ``path`` is not a folder.

    Args:
        path: the output file.
        label: how the messages name it, e.g. ``'--out'`` (default: the path alone).
        make_folder: the writer creates a missing folder: the nearest existing folder above must
            accept new files instead.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        VidDetError: ``"<label> <path>: <problem>"``.
    """
    path = Path(path)
    name = f'{label} {path}' if label else str(path)
    existing = next(p for p in itertools.chain([path.parent], path.parent.parents, [Path('.')]) if p.exists())
    if not existing.is_dir():
        raise VidDetError(f'{name}: {existing} is a file, not a folder')
    if existing != path.parent and not make_folder:
        raise VidDetError(f'{name}: the folder {path.parent} does not exist')
    for p in (path, partial_name(path)):
        if p.is_dir():
            raise VidDetError(f'{name}: {p} is a folder; give a file name')
    _try_create_in(existing, name)
    return path


def _try_create_in(folder: Path, name: str) -> None:
    """Creates and removes a hidden file in ``folder`` (catches read-only file systems, ``/proc``).

    Raises:
        VidDetError: ``"<name>: cannot create files in <folder> (<reason>)"``.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix='.viddet-write-check-', dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise VidDetError(f'{name}: cannot create files in {folder} ({os_error_reason(e)})') from None


def check_output_dir(path, label: str) -> Path:
    """Checks that output files can be written into the folder ``path`` before the work starts: it
    is a folder (or can be created: the nearest existing folder above it is a folder) and accepts new
    files (tried as :func:`check_output_path` does).

    Args:
        path: the output folder (not created here).
        label: how the messages name it, e.g. ``'--out-dir'``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        VidDetError: ``"<label> <path>: <problem>"`` (a file, not a folder; cannot create files).
    """
    path = Path(path)
    existing = next(p for p in itertools.chain([path], path.parents, [Path('.')]) if p.exists())
    if not existing.is_dir():
        what = 'is a file, not a folder' if existing == path else f'{existing} is a file, not a folder'
        raise VidDetError(f'{label} {path}: {what}')
    _try_create_in(existing, f'{label} {path}')
    return path


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)   # hard links, case-insensitive file systems
    except OSError:
        return False


def check_outputs(outputs: Sequence[Tuple[str, object]], inputs: Sequence[object] = ()) -> List[Path]:
    """Checks every output of a run before the work starts: each with :func:`check_output_path`,
    and that no file it writes (its final or its partial name) is one of the ``inputs`` or a file
    another output writes. Paths are compared after resolving links (``os.path.realpath``), and
    existing files also by identity (``os.path.samefile``: hard links).

    Args:
        outputs: ``(label, path)`` pairs, e.g. ``[('--out', 'a.mp4'), ('--json', 'a.jsonl')]``.
        inputs: the files the run reads (a video file, the frames of a folder).

    Returns:
        The output paths.

    Raises:
        VidDetError: naming both paths, e.g. ``"--out v.mp4 is the input v.mp4: it would be
            overwritten; give another --out"``.
    """
    written = []
    for label, path in outputs:
        path = check_output_path(path, label)
        written += [(label, path, path), (label, path, partial_name(path))]
    for label, path, f in written:
        for inp in inputs:
            if _same_file(f, Path(inp)):
                what = '' if f == path else f' (through its partial file {f})'
                raise VidDetError(f'{label} {path} is the input {inp}{what}: it would be overwritten; '
                                  f'give another {label}')
    for (l1, p1, f1), (l2, p2, f2) in itertools.combinations(written, 2):
        if p1 != p2 or l1 != l2:
            if _same_file(f1, f2):
                raise VidDetError(f'{l1} {p1} and {l2} {p2} would write the same file {f1}; '
                                  f'give them different names')
    return [path for _, path, f in written if f == path]


def check_output_options(folders: Sequence[Tuple[str, object]] = (), files: Sequence[Tuple[str, object]] = ()) -> None:
    """Checks a command's output folders (:func:`check_output_dir`) and files (:func:`check_output_path`;
    a missing folder is created by the atomic writers) before its work.

    Args:
        folders, files: ``(option, path)`` pairs, e.g. ``[('--out-dir', 'out')]``; a None path (an
            option not given) is skipped.

    Raises:
        VidDetError: as the two checks, naming the option.
    """
    for label, path in folders:
        if path is not None:
            check_output_dir(path, label)
    for label, path in files:
        if path is not None:
            check_output_path(path, label, make_folder=True)


@contextlib.contextmanager
def write_failures_reported(kept: str) -> Iterator[None]:
    """Turns an OSError of a write in the block (a full disk, a folder that became read-only) into
    one line naming the file, the reason and what is ``kept``.

    Raises:
        VidDetError: ``"cannot write <file>: <reason>; <kept>"``.
    """
    try:
        yield
    except OSError as e:
        raise VidDetError(f'cannot write {e.filename or "an output"}: {os_error_reason(e)}; {kept}') from None
