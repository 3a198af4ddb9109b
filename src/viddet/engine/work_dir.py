"""What a training run keeps in its work dir, and how a run finds its way back into it: training
checkpoints (model, optimizer, scaler, RNG states, position; written atomically), the
``last_checkpoint`` pointer, the newest intact checkpoint to resume from, the outputs that mark a
work dir as used, the temporaries a kill leaves, the JSONL log cut back to a checkpoint, the work
dir made ready for a run, and the config changes a resumed run should mention. Used by
:mod:`viddet.engine.train` and :mod:`viddet.engine.checkpointer`.
"""
from __future__ import annotations

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
from viddet.fileio import atomic_write_bytes, atomic_write_text
from viddet.version import __version__

CHECKPOINT_POINTER = 'last_checkpoint'
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
                    it: int, cfg: Config, epoch_done: bool, total_batch: int = 1) -> Path:
    """Writes a training checkpoint atomically (temp file + ``os.replace``) and updates the
    ``last_checkpoint`` pointer beside it.

    ``epoch`` = epochs completed (epoch_done) or the 0-based epoch in progress; ``it`` = optimizer
    steps done in total; ``schedule`` has a ``state_dict()`` (the trainer's ``LrSchedule``).
    """
    m = cfg.model
    obj = dict(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
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


def run_outputs(work_dir: Path) -> List[Path]:
    """The outputs of a training run in ``work_dir`` (checkpoints, pointer, log, config,
    TensorBoard, evaluations): what ``--overwrite`` deletes and what marks a work dir as used."""
    if not work_dir.is_dir():
        return []
    names = (CHECKPOINT_POINTER, LOG_FILE, 'config.yaml', 'tf_logs')
    return sorted(p for p in work_dir.iterdir()
                  if p.name in names or _CHECKPOINT_NAME.match(p.name) or (p.is_dir() and p.name.startswith('eval_')))


def check_work_dir(work_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuses to mix two runs in one work dir: without ``--resume`` or ``--overwrite`` the work
    dir must not hold another run's outputs.

    Raises:
        VidDetError: both options, a file where the work dir should be, or an earlier run.
    """
    if resume and overwrite:
        raise VidDetError('--resume continues the run in the work dir, --overwrite deletes it: give one of them')
    if work_dir.exists() and not work_dir.is_dir():
        raise VidDetError(f'--work-dir {work_dir} is a file, not a folder')
    found = run_outputs(work_dir)
    if found and not (resume or overwrite):
        names = ', '.join(p.name for p in found[:4]) + (' …' if len(found) > 4 else '')
        raise VidDetError(f'{work_dir} already holds a training run ({names}): continue it with --resume, start a '
                          f'new run with a fresh --work-dir, or replace it with --overwrite (deletes its checkpoints, '
                          f'logs and evaluations)')


_TEMP_NAME = re.compile(r'^\..+\.[a-z0-9_]{8}\.tmp$')   # fileio's atomic writers: .<name>.<random>.tmp


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
            say(f'--overwrite: deleted the earlier run in {work_dir} ({len(old)} entries)')
    stale = remove_stale_temporaries(work_dir)
    if stale:
        say(f'deleted {len(stale)} temporary file(s) of an interrupted save: '
            f'{", ".join(str(p.relative_to(work_dir)) for p in stale[:3])}')
    if resumed_at is not None:
        removed = truncate_log(work_dir / LOG_FILE, resumed_at)
        if removed:
            say(f'{LOG_FILE}: removed {removed} line(s) logged after iteration {resumed_at} (they are replayed)')
    save_config(cfg, work_dir / 'config.yaml')


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
