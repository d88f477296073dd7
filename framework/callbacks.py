"""Declaring what a callback reads from the Req, so the static check can see it.

    from diffstage import reads

    @reads("image_position_ids", optional=("guidance_scale",))
    def model_inputs(req, settings, transformer, negative): ...

The check folds these into the reads of the stage that calls the callback: a
field that no earlier stage writes (and the request does not supply) is then
reported at the callback's line in the YAML, before anything runs."""
from __future__ import annotations

from collections.abc import Callable, Iterable

READS = "__diffstage_reads__"
OPTIONAL_READS = "__diffstage_optional_reads__"


def reads(*fields: str, optional: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Mark a callback as reading `fields` (needed) and `optional` (read when set) from the Req."""
    names = tuple(fields) + tuple(optional)
    if not all(isinstance(f, str) and f.isidentifier() for f in names):
        raise TypeError(f"@reads takes Req field names, got {names!r}")

    def mark(fn: Callable) -> Callable:
        setattr(fn, READS, frozenset(fields))
        setattr(fn, OPTIONAL_READS, frozenset(optional))
        return fn

    return mark


def declared_reads(fn: object) -> tuple[frozenset[str], frozenset[str]]:
    """(reads, optional reads) a callback declared with @reads; nothing for undecorated ones."""
    fn = getattr(fn, "__func__", fn)  # a bound method (a stage's default_<name>)
    return getattr(fn, READS, frozenset()), getattr(fn, OPTIONAL_READS, frozenset())
