"""Exception types. Every problem a user can cause is a DiffstageError subclass,
so the CLI can print it cleanly and exit 2 instead of showing a traceback."""
from __future__ import annotations

from dataclasses import dataclass


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
