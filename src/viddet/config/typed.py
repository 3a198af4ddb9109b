"""The checked conversion of plain values (YAML, JSON, ``--set``) into typed dataclasses: unknown keys
get a "did you mean", wrong types and values a :class:`VidDetError` naming the source and the dotted
key. Used for the training config and for a method's inference settings."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Mapping, Tuple

from viddet.errors import VidDetError


_SCALARS = {
    bool: (lambda v: isinstance(v, bool), bool),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), int),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), float),
    str: (lambda v: isinstance(v, str), str),
}
"""scalar type -> (whether a plain value is one: YAML's true is no integer, 3 is a number, "3" no number;
the value converted)."""


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f'{type_name(args[0])} or null'
    if origin in (list, List):
        return f'list of {type_name(typing.get_args(tp)[0])}'
    if origin in (tuple, Tuple):
        return f'list of {len(typing.get_args(tp))} {type_name(typing.get_args(tp)[0])}s'
    if origin in (dict, Dict):
        return 'mapping'
    if dataclasses.is_dataclass(tp):
        return 'mapping'
    return {int: 'integer', float: 'number', bool: 'true/false', str: 'string'}.get(tp, str(tp))


def typed_value(value, tp, key: str, source: str):
    def bad():
        name = type_name(tp)
        article = 'an' if name[0] in 'aeiou' else 'a'
        return VidDetError(f'{source}: {key} must be {article} {name}, got {value!r} ({type(value).__name__})')
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return typed_value(value, args[0], key, source)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad()
        return from_dict(tp, value, key, source)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad()
        (sub,) = typing.get_args(tp)
        return [typed_value(v, sub, f'{key}.{i}', source) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        return tuple(typed_value(v, a, f'{key}.{i}', source) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if tp in _SCALARS:
        accepts, cast = _SCALARS[tp]
        if not accepts(value):
            raise bad()
        return cast(value)
    raise TypeError(f'unsupported config field type {tp} at {key}')


def from_dict(cls, d: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get('internal')}
    kwargs = {}
    for k, v in d.items():
        key = f'{prefix}.{k}' if prefix else str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f' (did you mean {prefix + "." if prefix else ""}{close[0]}?)' if close else ''
            raise VidDetError(f'{source}: unknown key {key}{hint}; '
                              f'known keys{" of " + prefix if prefix else ""}: {", ".join(fields)}')
        kwargs[k] = typed_value(v, hints[k], key, source)
    return cls(**kwargs)



def method_settings(method, values: Mapping[str, Any], source: str, prefix: str = 'test'):
    """``method.Settings`` (a :class:`viddet.methods.base.MethodSettings` dataclass) from plain
    ``values`` over its defaults.

    Args:
        method: a :class:`viddet.methods.base.VIDMethod` class.
        values: {setting name: plain value}.
        source, prefix: where the values come from, for messages (``--set``, ``test``).

    Raises:
        VidDetError: a name the method has no setting of (listing its settings), a wrong type, or a
            value out of range.
    """
    names = method.Settings.names()
    unknown = [k for k in values if k not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f' (did you mean {prefix}.{close[0]}?)' if close else ''
        raise VidDetError(f'{source}: {method.name} has no setting {prefix}.{unknown[0]}{hint}; '
                          f'its settings: {", ".join(names)}')
    try:
        return from_dict(method.Settings, dict(values), prefix, source)
    except ValueError as e:
        raise VidDetError(f'{source}: {prefix}.{e}') from None
