"""Downloads into the local cache: URLs and names become local files, downloaded once, atomically,
with a progress bar, their ``-<hex>`` file-name suffix checked against the SHA-256."""
from __future__ import annotations

import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from viddet.checkpoints.zoo import INIT_WEIGHTS, MODEL_ZOO, init_weights_url, zoo_url
from viddet.errors import VidDetError
from viddet.fileio import sha256_file
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
    file: a path, a URL, or an :data:`INIT_WEIGHTS` name such as ``torchvision://resnet50``. URLs and
    names are downloaded once into :func:`cache_dir` (under the published file name, whose
    ``-<hex>`` suffix is checked against the file's SHA-256 as for the VID checkpoints).

    Raises:
        VidDetError: naming ``key``: a missing file, an unknown name, or a failed download (with the
            URL and the cache path to put a manually downloaded file at).
    """
    instead = f'set {key} to the downloaded file'
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
                      f'({", ".join(INIT_WEIGHTS)}, or random)')


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
                raise VidDetError(
                    f'could not download {url} ({getattr(e, "reason", e)}). Without network access, download '
                    f'it elsewhere and put it at {dest}, or {instead}') from None
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
    if spec.startswith(('http://', 'https://')) or spec in MODEL_ZOO:
        return cached(zoo_url(spec) if spec in MODEL_ZOO else spec, progress)
    if p.suffix or os.sep in spec:
        raise VidDetError(f'checkpoint file {spec} does not exist')
    raise VidDetError(f'{spec!r} is neither a checkpoint file, a URL nor a model-zoo name '
                      f'(known: {", ".join(MODEL_ZOO)})')

