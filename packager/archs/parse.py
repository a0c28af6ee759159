"""The one parser of the architecture tables: JSON objects into frozen dataclasses, by their field types.

``parse(cls, data, where)`` refuses unknown keys, missing required keys and wrong types with one
line naming the table and the key, so a typo in a shipped table fails the test that loads every
table (tests/test_archs.py), not a user's export. Nested dataclasses, ``tuple[X, ...]``, fixed
tuples, ``dict[str, X]``, optionals and ``re.Pattern`` (compiled from a string) are understood.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Union

from xpack.errors import XpackError


def parse(cls: type, data: Any, where: str):
    """``data`` (a JSON object) as the frozen dataclass ``cls``; ``where`` names it in errors."""
    if not isinstance(data, dict):
        raise XpackError(f"{where} must be an object, got {_type_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise XpackError(f"{where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise XpackError(f"{where} lacks the required key '{name}'")
            continue
        values[name] = _convert(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**values)
    except ValueError as exc:  # a dataclass's own check of how its fields fit together
        raise XpackError(f"{where}: {exc}") from None


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except XpackError as exc:
                errors.append(str(exc))
        raise XpackError(errors[0] if len(errors) == 1 else f"{where} has the wrong type ({_type_name(value)})")
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise XpackError(f"{where} must be a list, got {_type_name(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise XpackError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise XpackError(f"{where} must be an object, got {_type_name(value)}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is re.Pattern:
        if not isinstance(value, str):
            raise XpackError(f"{where} must be a regular expression string, got {_type_name(value)}")
        try:
            return re.compile(value)
        except re.error as exc:
            raise XpackError(f"{where} is not a valid regular expression ({exc})") from None
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise XpackError(f"{where} must be {hint.__name__}, got {_type_name(value)}")
    return value


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__
