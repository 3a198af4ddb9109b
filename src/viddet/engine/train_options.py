"""The options of one ``viddet train`` run: how it runs, where the config says what is trained.
One definition serves :func:`viddet.engine.train.train`'s keyword arguments, the
:class:`~viddet.engine.train.Trainer` and the command line (:meth:`TrainOptions.from_args`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from viddet.errors import VidDetError


@dataclass(frozen=True)
class TrainOptions:
    """How one training run runs (the config says what is trained): the keyword arguments of
    :func:`train` and the options of ``viddet train`` (:meth:`from_args`).

    Raises:
        VidDetError: a count below its minimum or an unknown ``amp`` (naming the option).
    """
    resume: bool = False
    """Continue from the work dir's newest intact checkpoint (error if there is none)."""
    overwrite: bool = False
    """Delete an earlier run's outputs in the work dir first."""
    save_interval: Optional[int] = None
    """Also save ``iter_<n>.pth`` every N optimizer steps (a preempted run loses at most N steps)."""
    keep_checkpoints: int = 2
    """Keep the newest K ``iter_*.pth`` (0: all); ``epoch_*.pth`` are all kept."""
    amp: Optional[str] = None
    """None, ``'bf16'`` or ``'fp16'`` (autocast; fp16 adds a dynamic GradScaler starting at 512,
    MMTracking's fp16 loss scale)."""
    accumulate: int = 1
    """Micro-batches per optimizer step (a k x larger effective batch)."""
    max_iters: Optional[int] = None
    """Stop after this many optimizer steps in total (checkpoint ``iter_<n>.pth``)."""
    val_interval: Optional[int] = None
    """Evaluate every N epochs (overrides ``cfg.eval.interval``; 0 = end only)."""
    evaluate: bool = True
    """Run the evaluation(s) at all."""
    device: str = 'auto'
    """``auto``, ``cpu``, ``cuda``, ``cuda:1`` (``cuda``/``auto`` = ``cuda:<LOCAL_RANK>`` under torchrun)."""
    progress: bool = True
    """A tqdm bar (rank 0)."""
    threads: Optional[int] = None
    """``torch.set_num_threads`` for this process (None: torch's default). On a CPU shared with
    other jobs, 1 thread per process avoids OpenMP spin-waiting, which can make training 10x slower."""
    verbose: bool = True
    """Print what the run does (rank 0)."""

    def __post_init__(self):
        for name, value, low in (('--accumulate', self.accumulate, 1), ('--max-iters', self.max_iters, 1),
                                 ('--save-interval', self.save_interval, 1),
                                 ('--keep-checkpoints', self.keep_checkpoints, 0)):
            if value is not None and value < low:
                raise VidDetError(f'{name} must be >= {low}, got {value}')
        if self.amp not in (None, 'bf16', 'fp16'):
            raise VidDetError(f'--amp must be bf16 or fp16, got {self.amp!r}')

    @classmethod
    def from_args(cls, args) -> 'TrainOptions':
        """The options of a parsed ``viddet train`` command line: each by its field name, and
        ``--no-eval`` / ``--no-progress`` as ``evaluate`` / ``progress`` negated."""
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**dict(given, evaluate=not args.no_eval, progress=not args.no_progress))
