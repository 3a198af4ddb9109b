"""What a training run keeps in its work dir, and how a run finds its way back into it: training
checkpoints (model, optimizer, scaler, RNG states, position; written atomically), the
``last_checkpoint`` pointer, the newest intact checkpoint to resume from, the outputs that mark a
work dir as used, the temporaries a kill leaves, the JSONL log cut back to a checkpoint, the work
dir made ready for a run, and the config changes a resumed run should mention. Used by
:mod:`viddet.engine.train` and :mod:`viddet.engine.checkpointer`.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import json
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from viddet.checkpoints.reading import read_checkpoint_dict
from viddet.config.files import save_config
from viddet.config.training import Config
from viddet.errors import VidDetError
from viddet.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from viddet.locks import DIR_LOCK
from viddet.version import __version__

CHECKPOINT_POINTER = 'last_checkpoint'
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO)
"""The ``errno`` of a write the file system refused (full disk, quota, read-only or lost file system)."""
LOG_FILE = 'train_log.jsonl'


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, stored with weights_only-loadable types."""
    py = random.getstate()
    npst = np.random.get_state()
    st = dict(python=[py[0], list(py[1]), py[2]],
              numpy=[npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
              torch=torch.get_rng_state())
    if torch.cuda.is_available():
        st['cuda'] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py = st['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(st['torch'])
    if 'cuda' in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st['cuda'])


def save_checkpoint(path: Path, model: nn.Module, optimizer, schedule, scaler, epoch: int,
                    it: int, cfg: Config, epoch_done: bool, total_batch: int = 1, ema=None) -> Path:
    """Writes a training checkpoint atomically (temp file + ``os.replace``) and updates the
    ``last_checkpoint`` pointer beside it.

    ``epoch`` = epochs completed (epoch_done) or the 0-based epoch in progress; ``it`` = optimizer
    steps done in total; ``schedule`` has a ``state_dict()`` (the trainer's ``LrSchedule``). With
    ``ema`` (a :class:`viddet.engine.ema.WeightEMA`) ``state_dict`` holds the EMA weights (what
    ``viddet test`` loads), ``train_state_dict`` the trained ones and ``ema`` its counter.
    """
    m = cfg.model
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    extra = {}
    if ema is not None:
        extra = dict(train_state_dict=weights, ema=ema.counter())
        weights = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
    obj = dict(state_dict=weights, **extra,
               optimizer=optimizer.state_dict(), scheduler=schedule.state_dict(),
               scaler=scaler.state_dict() if scaler is not None else None,
               rng=rng_state(), epoch=epoch, iter=it, epoch_done=epoch_done, total_batch=total_batch,
               meta=dict(CLASSES=list(m.classes), method=m.method, backbone=m.backbone, config=cfg.to_dict(),
                         epoch=epoch, iter=it, viddet_version=__version__))
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_text(path.parent / CHECKPOINT_POINTER, path.name + '\n')
    return path


_CHECKPOINT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


def checkpoint_candidates(work_dir: Path, spe: int) -> List[Path]:
    """The work dir's training checkpoints (``epoch_<e>.pth`` = iteration e x ``spe``,
    ``iter_<i>.pth``), newest first."""
    found = []
    for p in Path(work_dir).glob('*.pth'):
        m = _CHECKPOINT_NAME.match(p.name)
        if m:
            found.append((int(m.group(2)) * (spe if m.group(1) == 'epoch' else 1), m.group(1) == 'epoch', p))
    return [p for _, _, p in sorted(found, reverse=True)]


def latest_checkpoint(work_dir: Path) -> Optional[Path]:
    """The checkpoint named in ``work_dir/last_checkpoint`` (or the newest ``*.pth`` by iteration)."""
    pointer = work_dir / CHECKPOINT_POINTER
    if pointer.is_file():
        p = work_dir / pointer.read_text().strip()
        if p.is_file():
            return p
    best, best_it = None, -1
    for p in work_dir.glob('*.pth'):
        try:
            it = int(read_checkpoint_dict(p).get('iter', -1))
        except VidDetError:   # a damaged file is skipped
            continue
        if it > best_it:
            best, best_it = p, it
    return best


def read_training_checkpoint(path: Path) -> dict:
    """A viddet training checkpoint, read safely (:func:`viddet.checkpoints.read_checkpoint_dict`).

    Raises:
        VidDetError: naming the file: unreadable (truncated, a full pickle) or not a training
            checkpoint (no optimizer / RNG / position, e.g. an MMTracking release file).
    """
    ckpt = read_checkpoint_dict(path)
    lacking = [k for k in ('state_dict', 'optimizer', 'rng', 'epoch', 'iter') if k not in ckpt]
    if lacking:
        raise VidDetError(f'{path} is not a viddet training checkpoint (no {", ".join(lacking)}): '
                          f'training cannot continue from it (to start from its weights use init.checkpoint)')
    return ckpt


MANIFEST = 'viddet_run.json'
RUN_OUTPUTS = (MANIFEST, 'config.yaml', LOG_FILE, CHECKPOINT_POINTER, 'epoch_*.pth', 'iter_*.pth', 'tf_logs/',
               'eval_*/')
"""What a training run writes into its work dir (``name/``: a folder), as its manifest
(``viddet_run.json``, written first) lists it: all that ``--overwrite`` deletes."""

_TEMP_NAME = re.compile(r'^\..+\.[a-z0-9_]{8}\.tmp$')   # fileio's atomic writers: .<name>.<random>.tmp


def _matches(p: Path, patterns) -> bool:
    return any(fnmatch.fnmatchcase(p.name, pat.rstrip('/')) and (p.is_dir() == pat.endswith('/'))
               for pat in patterns)


def inspect_work_dir(work_dir: Path):
    """What a work dir holds: ``(is_run, ours, foreign)``. ``is_run``: a viddet training run's manifest
    is there (or, from before manifests, a training checkpoint); ``ours``: the entries the manifest
    lists; ``foreign``: everything else, and in a folder that holds no run the entries a run would
    overwrite (the lock file and the temporaries of an interrupted save are neither).
    """
    if not work_dir.is_dir():
        return False, [], []
    entries = sorted(p for p in work_dir.iterdir() if p.name != DIR_LOCK and not _TEMP_NAME.match(p.name))
    patterns = RUN_OUTPUTS
    is_run = (work_dir / MANIFEST).is_file() or any(_CHECKPOINT_NAME.match(p.name) for p in entries)
    if (work_dir / MANIFEST).is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            listed = json.loads((work_dir / MANIFEST).read_text()).get('outputs')
            patterns = tuple(str(x) for x in listed) if isinstance(listed, list) and listed else RUN_OUTPUTS
    ours = [p for p in entries if _matches(p, patterns)]
    if not is_run:
        return False, [], ours
    return True, ours, [p for p in entries if p not in ours]


def _names(paths: List[Path]) -> str:
    return ', '.join(p.name + ('/' if p.is_dir() else '') for p in paths[:5]) + (' …' if len(paths) > 5 else '')


def run_outputs(work_dir: Path) -> List[Path]:
    """The outputs of the training run in ``work_dir`` (those its manifest lists; none when it holds
    no run): what ``--overwrite`` deletes."""
    return inspect_work_dir(work_dir)[1]


def check_work_dir(work_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuses to mix two runs in one work dir, or to touch what no run wrote: without ``--resume``
    or ``--overwrite`` the work dir must hold no run; ``--overwrite`` deletes only a run's outputs
    (its manifest's list), so a work dir holding anything else is refused; no run ever overwrites a
    file it did not write.

    Raises:
        VidDetError: both options, a file where the work dir should be, an earlier run, or files
            no viddet run wrote (naming them).
    """
    if resume and overwrite:
        raise VidDetError('--resume continues the run in the work dir, --overwrite deletes it: give one of them')
    if work_dir.exists() and not work_dir.is_dir():
        raise VidDetError(f'--work-dir {work_dir} is a file, not a folder')
    is_run, ours, foreign = inspect_work_dir(work_dir)
    if overwrite and foreign:
        raise VidDetError(f'--overwrite deletes only what a viddet training run wrote, and {work_dir} also holds '
                          f'{_names(foreign)}' + ('' if is_run else f' (it holds no run: no {MANIFEST})') +
                          ': move those away, or give another --work-dir')
    if is_run and not (resume or overwrite):
        raise VidDetError(f'{work_dir} already holds a training run ({_names(ours)}): continue it with --resume, '
                          f'start a new run with a fresh --work-dir, or replace it with --overwrite (deletes its '
                          f'checkpoints, logs and evaluations)')
    if foreign and not (resume or overwrite):
        raise VidDetError(f'{work_dir} holds {_names(foreign)}, which a training run would overwrite and no viddet '
                          f'run wrote (no {MANIFEST}): move them away, or give another --work-dir')


def remove_stale_temporaries(work_dir: Path) -> List[Path]:
    """Deletes the temporary files that writes interrupted by a kill left in ``work_dir`` (and its
    evaluation folders); returns them."""
    stale = [p for p in work_dir.rglob('.*.tmp') if p.is_file() and _TEMP_NAME.match(p.name)]
    for p in stale:
        p.unlink()
    return stale


def truncate_log(path: Path, it: int) -> int:
    """Keeps the JSONL log lines of iterations <= ``it`` (those after the checkpoint a run resumes
    from are replayed; a line cut by a kill is dropped). Returns the number of lines removed."""
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = int(json.loads(line)['iter']) <= it
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            removed += 1
    if removed:
        atomic_write_text(path, ''.join(line + '\n' for line in kept))
    return removed


def prepare_work_dir(work_dir: Path, cfg: Config, overwrite: bool, resumed_at: Optional[int],
                     say: Callable[[str], None]) -> None:
    """Rank 0, once the run is set up: the work dir, with an overwritten run's outputs deleted
    (``overwrite``), stale temporaries of an interrupted save deleted, the log cut back to the
    iteration a resumed run continues from (``resumed_at``; None: a new run), and the config
    saved as ``config.yaml``; ``say`` gets a line for each deletion."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        old = run_outputs(work_dir)
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if old:
            say(f'--overwrite: deleted the earlier run in {work_dir} ({_names(old)})')
    write_manifest(work_dir)
    stale = remove_stale_temporaries(work_dir)
    if stale:
        say(f'deleted {len(stale)} temporary file(s) of an interrupted save: '
            f'{", ".join(str(p.relative_to(work_dir)) for p in stale[:3])}')
    if resumed_at is not None:
        removed = truncate_log(work_dir / LOG_FILE, resumed_at)
        if removed:
            say(f'{LOG_FILE}: removed {removed} line(s) logged after iteration {resumed_at} (they are replayed)')
    save_config(cfg, work_dir / 'config.yaml')


def write_manifest(work_dir: Path) -> None:
    """``viddet_run.json``: marks ``work_dir`` as a training run's and lists what the run writes
    (:data:`RUN_OUTPUTS`), the only entries ``--overwrite`` may delete."""
    if not (work_dir / MANIFEST).is_file():
        atomic_write_json(work_dir / MANIFEST, {'written_by': 'viddet train', 'viddet_version': __version__,
                                                'outputs': list(RUN_OUTPUTS)}, indent=1)


def _flat(d, prefix: str = '') -> Dict[str, object]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, object] = {}
    for k, v in d.items():
        out.update(_flat(v, f'{prefix}.{k}' if prefix else str(k)))
    return out


def config_changes(old: dict, new: dict) -> List[str]:
    """``'key: old -> new'`` for every setting that differs between two ``Config.to_dict()``."""
    a, b = _flat(old), _flat(new)
    return [f'{k}: {a.get(k)} -> {b.get(k)}' for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
