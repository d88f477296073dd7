"""What a run tells whoever started it, step by step: the denoising stages report each finished step to the
run's observer (a server's progress, previews and cancellation), set by the caller around `Pipeline.run`.

The observer is a context variable, so it belongs to the thread (and run) that set it: pipelines running in
other threads report to their own. An observer may raise `RunCancelled` to end the run between two steps."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from .errors import DiffstageError


class RunCancelled(DiffstageError):
    """The run was ended between two denoising steps by its observer (a client that went away, a deadline)."""


@dataclass
class StepEvent:
    step: int  # steps done so far (1 after the first)
    total: int  # steps of this run
    latents: Any  # the latents after this step (None where the stage cannot show them)
    req: Any  # the run's Req, as the stage sees it


StepObserver = Callable[[StepEvent], None]
_OBSERVER: ContextVar[StepObserver | None] = ContextVar("diffstage_step_observer", default=None)


@contextmanager
def observing(observer: StepObserver | None) -> Iterator[None]:
    """Runs of this thread inside the block report their steps to `observer`."""
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def report_step(step: int, total: int, latents: Any, req: Any) -> None:
    """Called by a denoising stage after each step; the observer may raise RunCancelled."""
    observer = _OBSERVER.get()
    if observer is not None:
        observer(StepEvent(step, total, latents, req))
