"""Command-line interface: ``viddet demo|test|eval|convert|check-data|train|benchmark``.

Each subcommand parses its arguments and calls one function; user errors (:class:`VidDetError`)
are printed as one clear message without a traceback (exit status 2).
"""
from __future__ import annotations

import argparse
import sys

from viddet import VidDetError, __version__


# ---------------------------------------------------------------- demo (owner: core)
def add_demo_parser(sub):
    p = sub.add_parser('demo', help='run a model on a video file or frame folder; write an annotated MP4 and JSON lines',
                       description='Detect objects in every frame of a video (file, frame folder or stream) '
                                   'and write an annotated MP4 and one JSON record per frame.')
    p.set_defaults(func=lambda args: sys.exit('viddet demo: not implemented yet'))
    return p


# ---------------------------------------------------------------- convert / check-data / eval / test (owner: data+eval)
def add_data_parsers(sub):
    pass


# ---------------------------------------------------------------- train (owner: training)
def add_train_parser(sub):
    pass


# ---------------------------------------------------------------- benchmark (owner: speed)
def add_benchmark_parser(sub):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='viddet',
        description='Video object detection with DFF, FGFA, SELSA and Temporal RoI Align '
                    '(Faster R-CNN DC5); loads MMTracking checkpoints unchanged.')
    parser.add_argument('--version', action='version', version=f'viddet {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    add_demo_parser(sub)
    add_data_parsers(sub)
    add_train_parser(sub)
    add_benchmark_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except VidDetError as e:
        print(f'viddet {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'viddet {args.command}: interrupted', file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == '__main__':
    sys.exit(main())
