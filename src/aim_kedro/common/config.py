"""Typed configs from parameter mappings: the one unknown-key check, with the closest valid key.

Every config dataclass of the project is built from a ``conf/base`` block through
``from_mapping``, so a typo anywhere (``keep_fractoin``) fails at once, naming the parameter's
full path and the key that was probably meant, instead of being silently ignored. A field whose
type is itself a config dataclass is built the same way from its sub-mapping, so a nested block
(``evaluation.probes.low_shot``) is checked at every depth.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

C = TypeVar("C")


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid key most like ``name`` (difflib ratio >= 0.6), or None."""
    found = difflib.get_close_matches(str(name), sorted(valid), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_keys_message(unknown: Iterable[str], valid: Iterable[str], where: str) -> str:
    """``unknown <where> parameter(s) [...]`` with a "did you mean" per key and the valid keys."""
    valid = sorted(valid)
    unknown = sorted(unknown)
    hints = [f"{key!r} -> {hint!r}" for key in unknown if (hint := closest(key, valid))]
    did_you_mean = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"unknown {where} parameter(s) {unknown}{did_you_mean}; valid keys: {valid}"


def check_choice(value: Any, choices: Iterable[Any], where: str, hint: str = "") -> None:
    """Raise a ValueError "``where`` must be one of [...], got ``value``" (and ``hint``, after a
    semicolon) unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{where} must be one of {choices}, got {value!r}"
                         + (f"; {hint}" if hint else ""))


def check_keys(values: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raise ValueError naming every key of ``values`` that is not in ``valid``."""
    valid = set(valid)
    unknown = set(values) - valid
    if unknown:
        raise ValueError(unknown_keys_message(unknown, valid, where))


def _dataclass_of(annotation: Any) -> type | None:
    """The config dataclass a field holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(found) == 1:
            return _dataclass_of(found[0])
    return None


def from_mapping(cls: type[C], values: Mapping[str, Any] | None, where: str) -> C:
    """``cls(**values)`` for a dataclass, after checking every key is one of its init fields
    and that every field without a default is given.

    ``where`` is the parameter path used in messages (``curation.dedup``). A mapping given for a
    field typed as a dataclass (or ``dataclass | None``) is built with ``from_mapping`` too, its
    path ``where.<field>``.
    """
    if values is not None and not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    values = dict(values or {})
    fields = [f for f in dataclasses.fields(cls) if f.init]
    check_keys(values, (f.name for f in fields), where)
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"{where} lacks {missing}; it needs {required}")
    if any(isinstance(value, Mapping) for value in values.values()):
        hints = _type_hints(cls)
        for f in fields:
            nested = _dataclass_of(hints.get(f.name))
            if nested is not None and isinstance(values.get(f.name), Mapping):
                values[f.name] = from_mapping(nested, values[f.name], f"{where}.{f.name}")
    return cls(**values)


def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of ``cls`` (none when an annotation cannot be resolved)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


__all__ = ["check_choice", "check_keys", "closest", "from_mapping", "unknown_keys_message"]
