"""The stage classes a model YAML may name by short path (`diffstage.stages.NAME`).

The framework checks and builds stages without importing any: the entry point (the `diffstage` package,
which the command line and every Python import go through) hands the standard stages over with
`use_standard_stages`, so the import graph runs one way, framework <- stages <- entry point."""
from __future__ import annotations

from collections.abc import Iterable

from .errors import DiffstageError

_STANDARD: list[type] = []  # filled once, by the entry point, with diffstage.stages.STANDARD_STAGES


def use_standard_stages(classes: Iterable[type]) -> None:
    _STANDARD[:] = list(classes)


def standard_stages() -> list[type]:
    """The standard stage classes (a copy)."""
    if not _STANDARD:  # only when a framework module is loaded without the package: a packaging bug
        raise DiffstageError("the standard stages are not registered; import diffstage (its __init__ does it)")
    return list(_STANDARD)
