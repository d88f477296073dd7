"""Environment variables diffstage reads, parsed when they are needed (never at import, so one bad value
breaks only the command that uses it) and refused with the variable's name and what it must hold."""
from __future__ import annotations

import os

from .errors import DiffstageError, shown


def env_int(name: str, default: int, minimum: int, maximum: int | None = None, unit: str = "",
            why: str = "") -> int:
    """The whole number in environment variable `name` (`default` when unset or empty)."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw.strip()) if len(raw) < 20 else None  # int() of a 5,000-character number is slow and means nothing here
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        expected = f"a whole number{f' of {unit}' if unit else ''}, " + (
            f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}")
        raise DiffstageError(f"environment variable {name}={shown(raw)}: expected {expected}"
                             + (f" ({why})" if why else ""))
    return value


def env_choice(name: str, choices: tuple[str, ...], why: str = "") -> str | None:
    """The value of environment variable `name` if it is one of `choices`; None when unset or empty."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return None
    if raw.strip() not in choices:
        raise DiffstageError(f"environment variable {name}={shown(raw)}: expected one of {', '.join(choices)}"
                             + (f" ({why})" if why else ""))
    return raw.strip()
