"""Typed configs from parameter mappings: the one unknown-key check, with the closest valid key.

Every config dataclass of the project is built from a ``conf/base`` block through
``from_mapping``, so a typo anywhere (``keep_fractoin``) fails at once, naming the parameter's
full path and the key that was probably meant, instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
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


def check_keys(values: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raise ValueError naming every key of ``values`` that is not in ``valid``."""
    valid = set(valid)
    unknown = set(values) - valid
    if unknown:
        raise ValueError(unknown_keys_message(unknown, valid, where))


def from_mapping(cls: type[C], values: Mapping[str, Any] | None, where: str) -> C:
    """``cls(**values)`` for a dataclass, after checking every key is one of its init fields.

    ``where`` is the parameter path used in messages (``curation.dedup``).
    """
    if values is not None and not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    values = dict(values or {})
    check_keys(values, (f.name for f in dataclasses.fields(cls) if f.init), where)
    return cls(**values)


__all__ = ["check_keys", "closest", "from_mapping", "unknown_keys_message"]
