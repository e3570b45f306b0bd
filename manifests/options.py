"""Typed ``key=value`` overrides (``--set``), converted to the type of each option's default."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from .errors import ManifestError

TRUE_WORDS, FALSE_WORDS = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


def parse_bool(value: Any) -> bool | None:
    """A boolean as YAML, click flags and ``--set`` spell it: a bool, or one of :data:`TRUE_WORDS` /
    :data:`FALSE_WORDS` in any case (the caller strips spaces where it allows them); None otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    return True if text in TRUE_WORDS else False if text in FALSE_WORDS else None


def parse_overrides(pairs: list[str] | tuple[str, ...], defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Turn ``["num_clips=12", "frames=true"]`` into ``{"num_clips": 12, "frames": True}``.

    Keys must be among ``defaults``; values take the type of the default (bool, int, float, str;
    a default of None or a required option keeps the string). Errors name the pair and the fix.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ManifestError(f"--set {pair!r} is not key=value. Fix: write e.g. --set {next(iter(defaults), 'key')}=VALUE")
        if key not in defaults:
            raise ManifestError(f"{what} has no option {key!r}. Fix: use one of {', '.join(sorted(defaults)) or 'none'}")
        out[key] = _convert(key, raw, defaults[key])
    return out


def _convert(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        flag = parse_bool(raw.strip())
        if flag is not None:
            return flag
        raise ManifestError(f"--set {key}={raw!r}: expected true or false. Fix: --set {key}=true")
    for typ in (int, float):
        if isinstance(default, typ):
            try:
                return typ(raw)
            except ValueError:
                raise ManifestError(f"--set {key}={raw!r}: expected {typ.__name__}. Fix: --set {key}={default}"
                                    ) from None
    if default is inspect.Parameter.empty or default is None or isinstance(default, str):
        return raw
    raise ManifestError(f"--set {key}: options of type {type(default).__name__} cannot be set from the command line")
