"""Downloads into the local cache: URLs and names become local files, downloaded once, atomically,
with a progress bar, their ``-<hex>`` file-name suffix checked against the SHA-256. The YOLOV
family's released weights (:data:`~viddet.checkpoints.zoo.YOLOV_ZOO`) come from Google Drive through
the optional package ``gdown`` (``pip install "viddet[yolov]"``) or over HTTPS, and are checked
against the SHA-256 recorded at their first download (:func:`released`)."""
from __future__ import annotations

import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from viddet.checkpoints.zoo import INIT_WEIGHTS, MODEL_ZOO, YOLOV_ZOO, ReleasedWeights, init_weights_url, zoo_url
from viddet.errors import VidDetError
from viddet.fileio import atomic_write_text, sha256_file
from viddet.runtime import viddet_home


def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$VIDDET_HOME/checkpoints`` (default ``~/.cache/viddet``)."""
    return viddet_home() / 'checkpoints'


def cached(url: str, progress: bool = True, instead: str = 'pass --checkpoint /path/to/file.pth') -> Path:
    """The cached copy of ``url`` (:func:`cache_dir` / its file name), downloaded first when absent
    (:func:`download`; ``instead`` completes the advice of a failed download)."""
    dest = cache_dir() / url.rstrip('/').split('/')[-1]
    return dest if dest.is_file() else download(url, dest, progress, instead)


def resolve_init_weights(spec: str, key: str, progress: bool = True) -> Path:
    """An initial-weights setting (``init.backbone_weights`` / ``init.flownet_weights``) -> a local
    file: a path, a URL, an :data:`INIT_WEIGHTS` name such as ``torchvision://resnet50``, or a
    :data:`YOLOV_ZOO` name (``yolox_s_vid``: :func:`released`). URLs and :data:`INIT_WEIGHTS` names
    are downloaded once into :func:`cache_dir` (under the published file name, whose ``-<hex>``
    suffix is checked against the file's SHA-256 as for the VID checkpoints).

    Raises:
        VidDetError: naming ``key``: a missing file, an unknown name, or a failed download (with the
            URL and the cache path to put a manually downloaded file at).
    """
    instead = f'set {key} to the downloaded file'
    if spec in YOLOV_ZOO:
        return released(spec, progress, instead)
    if spec in INIT_WEIGHTS or spec.startswith(('http://', 'https://')):
        url = init_weights_url(spec) if spec in INIT_WEIGHTS else spec
        # a mirror keeps the published file name: the cache holds it under that name
        dest = cache_dir() / (INIT_WEIGHTS[spec] if spec in INIT_WEIGHTS else spec).rstrip('/').split('/')[-1]
        return dest if dest.is_file() else download(url, dest, progress, instead)
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.suffix or os.sep in spec:
        raise VidDetError(f'{key}: file {spec} does not exist')
    raise VidDetError(f'{key}: {spec!r} is neither a file, a URL nor a known name of initial weights '
                      f'({", ".join([*INIT_WEIGHTS, *YOLOV_ZOO])}, or random)')


def _unreachable(url: str, reason, dest: Path, instead: str) -> str:
    """The one-line message of a download that could not start (no network, unknown host, refused)."""
    reason = ' '.join(str(reason).split())
    reason = reason if len(reason) <= 200 else reason[:199] + '…'
    return (f'could not download {url} ({reason}). Without network access, download it elsewhere and put it '
            f'at {dest}, or {instead}')


def _hash_prefix(filename: str) -> Optional[str]:
    m = re.search(r'-([0-9a-f]{8,64})\.pth$', filename)
    return m.group(1) if m else None


def download(url: str, dest: Path, progress: bool = True,
             instead: str = 'pass --checkpoint /path/to/file.pth') -> Path:
    """Downloads ``url`` to ``dest`` atomically, with a progress bar, verifying the hash prefix.

    The file name's ``-<hex>.pth`` suffix (MMTracking's publish convention) must be a prefix of
    the file's SHA-256. ``instead`` completes the advice of a failed download ("..., or <instead>").

    Raises:
        VidDetError: network failure, including a connection that ends before the announced
            Content-Length (saying where to put a manually downloaded file), or hash mismatch.
    """
    from tqdm import tqdm
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + '.', suffix='.part', dir=dest.parent)
    try:
        with os.fdopen(fd, 'wb') as out:
            try:
                resp = urllib.request.urlopen(url, timeout=30)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise VidDetError(_unreachable(url, getattr(e, 'reason', e), dest, instead)) from None
            total = int(resp.headers.get('Content-Length') or 0) or None
            received = 0
            try:
                with resp, tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                                desc=f'downloading {dest.name}', disable=not progress) as bar:
                    for chunk in iter(lambda: resp.read(1 << 20), b''):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # connection reset, timeout, disk full
                raise VidDetError(f'downloading {url} failed after {received} bytes ({type(e).__name__}: {e}). '
                                  f'Try again, or download it elsewhere and put it at {dest}') from None
            # http.client returns b'' (no error) when the server closes the connection early
            if total is not None and received != total:
                raise VidDetError(f'downloading {url} stopped after {received} of {total} bytes. '
                                  f'Try again, or download it elsewhere and put it at {dest}')
        prefix = _hash_prefix(dest.name)
        if prefix is not None:
            digest = sha256_file(Path(tmp))
            if not digest.startswith(prefix):
                raise VidDetError(f'downloaded {url} but its SHA-256 {digest[:12]}… does not start with '
                                  f'{prefix} as its name says: the file is corrupt or not the published one')
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def resolve_checkpoint(spec: str, progress: bool = True) -> Path:
    """A local path, a URL or a model-zoo name (e.g. ``selsa_r50``) -> a local file path.

    URLs and zoo names are downloaded once into :func:`cache_dir`.

    Raises:
        VidDetError: unknown name / missing file / failed download, with what to do about it.
    """
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise VidDetError(f'checkpoint {spec} is a folder, not a checkpoint file (give the .pth file in it)')
    if spec in YOLOV_ZOO:
        return released(spec, progress)
    if spec.startswith(('http://', 'https://')) or spec in MODEL_ZOO:
        return cached(zoo_url(spec) if spec in MODEL_ZOO else spec, progress)
    if p.suffix or os.sep in spec:
        raise VidDetError(f'checkpoint file {spec} does not exist')
    raise VidDetError(f'{spec!r} is neither a checkpoint file, a URL nor a model-zoo name '
                      f'(known: {", ".join([*MODEL_ZOO, *YOLOV_ZOO])})')


def released(name: str, progress: bool = True, instead: str = 'pass --checkpoint /path/to/file.pth') -> Path:
    """The cached copy of a :data:`YOLOV_ZOO` file, ``cache_dir() / "<name>.pth"``, downloaded first
    when absent (Google Drive files through ``gdown``, the Hugging Face file by :func:`download`),
    then checked against its SHA-256: the table's when known, else the one recorded in
    ``<name>.pth.sha256`` beside it at its first use (written then, so a file that later changes —
    a damaged copy, another file put in its place — is refused).

    Raises:
        VidDetError: a Google Drive folder (one file cannot be fetched from it), ``gdown`` not
            installed, a failed download (saying where to put a manually downloaded file), or a
            SHA-256 that differs (a fresh download is then deleted).
    """
    entry = YOLOV_ZOO[name]
    dest = cache_dir() / f'{name}.pth'
    fresh = not dest.is_file()
    if fresh and entry.is_folder:
        raise VidDetError(f'{name} is published as a Google Drive folder ({entry.url}), not as one file: download '
                          f'its checkpoint by hand and put it at {dest}, or {instead}')
    if fresh and entry.drive_id:
        _download_drive(entry, dest, progress, instead)
    elif fresh:
        download(entry.url, dest, progress, instead)
    _check_released(entry, dest, fresh, progress)
    return dest


def _download_drive(entry: ReleasedWeights, dest: Path, progress: bool, instead: str) -> None:
    """A Google Drive file -> ``dest`` (atomically) with ``gdown``, which handles Drive's
    confirmation page for large files."""
    try:
        import gdown
    except ImportError:
        raise VidDetError(f'{dest.stem} is on Google Drive, which needs the optional package gdown: pip install '
                          f'"viddet[yolov]" (or gdown); or download {entry.url} elsewhere and put it at {dest}, '
                          f'or {instead}') from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + '.', suffix='.part', dir=dest.parent)
    os.close(fd)
    try:
        try:   # gdown raises requests' errors or its own; older versions return None
            got, reason = gdown.download(id=entry.drive_id, output=tmp, quiet=not progress), 'gdown fetched nothing'
        except Exception as e:   # noqa: BLE001 - any failure of the downloader is a failed download
            got, reason = None, f'{type(e).__name__}: {e}'
        if got is None or not os.path.getsize(tmp):
            raise VidDetError(_unreachable(entry.url, reason, dest, instead))
        os.replace(tmp, dest)
    finally:
        for leftover in dest.parent.glob(Path(tmp).name + '*'):   # ours, and gdown's own partial file
            leftover.unlink()


def _check_released(entry: ReleasedWeights, dest: Path, fresh: bool, progress: bool) -> None:
    record = dest.with_name(dest.name + '.sha256')
    expected = entry.sha256 or (record.read_text().split()[0] if record.is_file() else None)
    digest = sha256_file(dest)
    if expected is not None and digest != expected:
        if fresh:
            dest.unlink()
            raise VidDetError(f'downloaded {entry.url} but its SHA-256 {digest[:12]}… is not {expected[:12]}…: '
                              f'the file is corrupt or not the published one')
        raise VidDetError(f'{dest}: its SHA-256 {digest[:12]}… is not the {expected[:12]}… '
                          f'{"published" if entry.sha256 else f"recorded in {record.name} at its first use"}: the '
                          f'file is damaged or was replaced; delete it (and {record.name}) to download it again')
    if not record.is_file():
        atomic_write_text(record, digest + '\n')
        if fresh and progress:
            print(f'{dest.name}: SHA-256 {digest} (recorded in {record})', file=sys.stderr)

