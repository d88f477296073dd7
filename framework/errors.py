"""Exception types. Every problem a user can cause is a DiffstageError subclass,
so the CLI can print it cleanly and exit 2 instead of showing a traceback."""
from __future__ import annotations

import difflib
import reprlib
from dataclasses import dataclass
from typing import Any

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = 80
_SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3
MAX_SHOWN = 200  # characters of one value in a message
MAX_MESSAGE = 600  # characters of one problem's message (and of its hint)
MAX_PROBLEMS = 50  # problems listed in one error; the rest are counted


def shown(value: Any) -> str:
    """A user value as it appears in a message: repr, truncated. A YAML alias bomb or a
    50 MB string must not turn into a 50 MB message (or hang while building one)."""
    try:
        text = _SHOWN.repr(value)
    except Exception:  # a value whose __repr__ fails is still reported, by type
        return f"<{type(value).__name__}>"
    return clipped(text)


def clipped(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` cut to `limit` characters, the cut marked in the middle so both ends stay readable."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return text[:half] + "..." + text[len(text) - (limit - 3 - half):]


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
            where += f": {clipped(self.key)}"
        return where

    def __str__(self) -> str:
        # user values reach messages through keys, targets and names too: every part is capped
        text = f"{self.location()}: "
        if self.stage:
            text += f"[{clipped(self.stage, 80)}] "
        text += clipped(self.message, MAX_MESSAGE)
        if self.hint:
            text += f" ({clipped(self.hint, MAX_MESSAGE)})"
        return text


class SpecError(DiffstageError):
    """A model spec failed validation; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in model spec:"
        lines = [head] + [f"  - {p}" for p in self.problems[:MAX_PROBLEMS]]
        if n > MAX_PROBLEMS:
            lines.append(f"  ... and {n - MAX_PROBLEMS} more (fix these first)")
        super().__init__("\n".join(lines))


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


class StageError(DiffstageError):
    """A stage or one of its callbacks failed while running; the original exception is its __cause__.
    Usually a model YAML whose arguments or callbacks check out but do not fit the model at run time."""


class ConcurrentUseError(DiffstageError):
    """A pipeline was called again from inside one of its own runs."""


def strict_bool(value: Any, key: str) -> bool:
    """A config boolean: only true/false. `bool("no")` is True, so strings are refused, not guessed."""
    if isinstance(value, bool):
        return value
    raise DiffstageError(f"{key} must be true or false, got {shown(value)} ({type(value).__name__})")


def did_you_mean(name: object, options) -> str | None:
    """"did you mean 'x'?" for the option closest to a misspelt `name`, or None when none is close."""
    match = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None


class LoraError(DiffstageError):
    """A LoRA adapter file or a `lora`/`loras` entry that cannot be used: names the file and the key."""
