"""Exception types. Every problem a user can cause is a DiffstageError subclass,
so the CLI can print it cleanly and exit 2 instead of showing a traceback."""
from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = 80
_SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3
MAX_SHOWN = 200  # characters of one value in a message


def shown(value: Any) -> str:
    """A user value as it appears in a message: repr, truncated. A YAML alias bomb or a
    50 MB string must not turn into a 50 MB message (or hang while building one)."""
    try:
        text = _SHOWN.repr(value)
    except Exception:  # a value whose __repr__ fails is still reported, by type
        return f"<{type(value).__name__}>"
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


class DiffstageError(Exception):
    """Base class for errors caused by user input (config, files, requests)."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a model spec: where it is, what is wrong, how out."""

    message: str
    key: str = ""  # key path, e.g. "stages[3].encoders"
    file: str | None = None
    line: int | None = None  # 1-based
    hint: str | None = None
    stage: str | None = None  # stage class name, when the problem is about one

    def location(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        if self.key:
            where += f": {self.key}"
        return where

    def __str__(self) -> str:
        text = f"{self.location()}: "
        if self.stage:
            text += f"[{self.stage}] "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class SpecError(DiffstageError):
    """A model spec failed validation; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in model spec:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


class DisallowedPathError(DiffstageError):
    """A dotted path points outside the import allowlist."""


class UnsafeCheckpointError(DiffstageError):
    """A checkpoint would need pickle to load and pickle was not allowed."""


class LoadError(DiffstageError):
    """A model directory, repo id or module could not be loaded."""


class RequestError(DiffstageError):
    """A generation request is out of range or malformed."""


class OutputError(DiffstageError):
    """An output file or run directory cannot be written."""


class ConcurrentUseError(DiffstageError):
    """A pipeline was called again from inside one of its own runs."""


def strict_bool(value: Any, key: str) -> bool:
    """A config boolean: only true/false. `bool("no")` is True, so strings are refused, not guessed."""
    if isinstance(value, bool):
        return value
    raise DiffstageError(f"{key} must be true or false, got {shown(value)} ({type(value).__name__})")
