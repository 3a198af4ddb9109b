"""Config files: YAML (1.2 floats) read with ``base:`` chains, ``--set KEY=VALUE`` overrides applied
to the plain dicts, and writing a config back."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import yaml

from viddet.errors import VidDetError


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-4`` and ``5E3`` are numbers (YAML 1.1, which
    PyYAML follows, needs a dot and a signed exponent, ``1.0e-4``, and reads ``1e-4`` as a string)."""


_YamlLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$''', re.X),
    list('-+0123456789.'))


def yaml_load(text: str, source: str):
    """Parses YAML text (YAML 1.2 floats, see :class:`_YamlLoader`).

    Raises:
        VidDetError: not valid YAML, naming ``source`` and the line and column of the error.
    """
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise VidDetError(f'{source}: not valid YAML{where}: {problem}') from None


def parse_override(text: str) -> Tuple[str, Any]:
    """``"schedule.epochs=3"`` -> ``("schedule.epochs", 3)`` (the value is parsed as YAML).

    Raises:
        VidDetError: no ``=`` or an empty key.
    """
    if '=' not in text:
        raise VidDetError(f'--set {text!r}: expected KEY=VALUE, e.g. --set schedule.epochs=3')
    key, raw = text.split('=', 1)
    key = key.strip()
    if not key or any(not p for p in key.split('.')):
        raise VidDetError(f'--set {text!r}: bad key {key!r}')
    try:
        value = yaml.load(raw, Loader=_YamlLoader) if raw.strip() else ''  # noqa: S506
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(raw: dict, key: str, value, source: str = '--set') -> None:
    """Sets ``raw[a][b]... = value`` for the dotted ``key`` (integer parts index lists).

    Missing intermediate mappings are created (the typed conversion then rejects unknown keys).

    Raises:
        VidDetError: a key that goes through a non-mapping, or a list index out of range.
    """
    parts = key.split('.')
    node = raw
    for i, p in enumerate(parts[:-1]):
        where = '.'.join(parts[:i + 1])
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise VidDetError(f'{source} {key}: {where} is not an index of a list of {len(node)} items')
            node = node[int(p)]
        elif isinstance(node, dict):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        else:
            raise VidDetError(f'{source} {key}: {".".join(parts[:i])} is a value, not a section')
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise VidDetError(f'{source} {key}: {last} is not an index of a list of {len(node)} items')
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise VidDetError(f'{source} {key}: cannot set a key inside a value')



def parse_test_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``--set test.KEY=VALUE`` options of ``demo`` / ``test`` -> {KEY: value} (values parsed as YAML;
    checked against the method's settings when the model is loaded:
    :func:`viddet.config.typed.method_settings`).

    Raises:
        VidDetError: not ``test.KEY=VALUE``.
    """
    out: Dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition('.')
        if section != 'test' or not name or '.' in name:
            raise VidDetError(f'--set {text!r}: expected test.KEY=VALUE (see --help for the settings of each method)')
        out[name] = value
    return out


def read_with_bases(path: Path, seen: Tuple[Path, ...]) -> dict:
    """The raw dict of a config file with its ``base`` chain merged in."""
    if not path.is_file():
        where = f' (the base of {seen[-1]})' if seen else ''
        raise VidDetError(f'config file {path} does not exist{where}')
    if path.resolve() in seen:
        raise VidDetError(f'{path}: "base" chain loops back to itself')
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise VidDetError(f'cannot read config file {path}: {e}') from None
    raw = yaml_load(text, str(path)) or {}
    if not isinstance(raw, dict) or 'base' not in raw:
        return raw
    base = raw.pop('base')
    if not isinstance(base, str):
        raise VidDetError(f'{path}: base must be a config file name, got {base!r}')
    return merged(read_with_bases(path.parent / base, seen + (path.resolve(),)), raw)


def merged(base: dict, top: dict) -> dict:
    """``top`` over ``base``: nested mappings merged key by key, other values replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg, path) -> Path:
    """Writes ``cfg`` (a :class:`viddet.config.training.Config`) as YAML (atomically)."""
    from viddet.fileio import atomic_write_text
    return atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
