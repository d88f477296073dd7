"""RunHook: what acts around one run of a pipeline and around each of its stages.

Features that change how modules are held or what they compute, rather than what a stage does (LoRA
adapters chosen per request, offloading modules between stages), plug in here instead of into every
stage. A Pipeline calls its hooks in order: `around_run` wraps the stages of one run, `before_stage` and
`after_stage` bracket each stage that runs (a reused stage does not), `memory_estimate` adds what the hook
allocates to the pre-run memory check, and `module_key` lets a hook tell the stage-output reuse cache that a
module computes something else during this run."""
from __future__ import annotations

import contextlib
from typing import Any


class RunHook:
    """The base hook does nothing; a hook overrides what it needs."""

    def around_run(self, req: Any) -> contextlib.AbstractContextManager:
        """A context entered before the first stage of a run and left after the last (or on error)."""
        return contextlib.nullcontext()

    def before_stage(self, stage: Any, req: Any) -> None:
        """Called right before `stage` runs (also for the stages a preview runs)."""

    def after_stage(self, stage: Any, req: Any) -> None:
        """Called right after `stage` ran (not when it raised: `around_run`'s exit cleans up then)."""

    def memory_estimate(self, stages: list[Any], req: Any) -> dict[str, int]:
        """Bytes this hook will allocate during a run of `req` (weights it loads), for the pre-run memory check."""
        return {}

    def module_key(self, module: Any, key: str, req: Any) -> str:
        """The key the reuse cache knows `module` by in this run (default: where it was loaded from)."""
        return key
