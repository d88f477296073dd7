"""Step caches: skip most of the transformer on steps where its input barely changed.

Consecutive denoising steps feed the transformer nearly the same input, so its blocks add nearly
the same residual. A step cache measures how much the input moved since the last step it computed
and, below a threshold, adds that step's residual (optionally extrapolated from the last two)
instead of running the blocks. Two ways to measure it:

- `first_block` (FBCache / cache-dit's DBCache with Bn=0): run the first `compute_first` blocks
  on every step; the relative L1 change of their residual decides whether the rest runs.
- `teacache` (TeaCache): the relative L1 change of the first block's timestep-modulated input,
  rescaled by a per-model polynomial and accumulated over the skipped steps, decides whether
  any block runs; a skipped step costs one modulation, not a block.

A transformer takes part by taking a `step_cache` argument in its forward call and routing its
blocks through it (see `Cacheable`), or, for a stock transformer, through the blocks its model YAML
declares (`acceleration:`, see block_cache.py; teacache when it declares a `probe` too). DenoisingStage
makes a cache of its own for each run (`for_run`), passes it with every transformer call and names the
branch (cond, uncond, or both in one batch); each branch keeps its own state. The cache is an argument,
not an attribute of the transformer, because pipelines share their loaded transformer: a cache set on it
by one pipeline's run would be used by another's running at the same time in another thread. Under
torchrun the change is summed over all ranks before the comparison, so every rank takes
the same decision (sequence and CFG parallelism stay in step).
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from .errors import DiffstageError, did_you_mean, shown

log = logging.getLogger(__name__)

KINDS = ("none", "first_block", "teacache")
# Keys of the run config's `cache:` section and of a model YAML's `step_cache.<kind>:` sections.
SETTINGS = ("kind", "threshold", "warmup", "final", "max_in_row", "compute_first", "extrapolate", "coefficients")

# The settings each kind reads (the others would be silently ignored: make_step_cache warns).
USED_BY = {"none": (), "first_block": tuple(k for k in SETTINGS if k not in ("kind", "coefficients")),
           "teacache": tuple(k for k in SETTINGS if k not in ("kind", "compute_first"))}

# RunBlocks(hidden, context, start, stop) -> (hidden, context): blocks [start, stop) of the model.
RunBlocks = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


class Cacheable(Protocol):
    """What a transformer offers a step cache (a native transformer that routes its blocks through it):
    `forward(..., step_cache=None)` runs its blocks through the cache when given one."""

    def cache_probe(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The first block's timestep-modulated input (TeaCache's measure)."""


def takes_step_cache(transformer: Any) -> bool:
    """Whether a transformer's forward takes the `step_cache` argument (see Cacheable)."""
    try:
        return "step_cache" in inspect.signature(transformer.forward).parameters
    except (AttributeError, TypeError, ValueError):  # no forward, or one without a readable signature
        return False


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old|, summed over every rank under torchrun (one decision for all)."""
    sums = torch.stack([(new.float() - old.float()).abs().sum(), old.float().abs().sum()])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    change, base = float(sums[0]), float(sums[1])
    return change / base if base > 0 else math.inf


@dataclass
class _Branch:
    """What one CFG branch remembers between steps."""

    residual: torch.Tensor | None = None  # what the skippable blocks added at the last computed step
    previous: torch.Tensor | None = None  # the residual computed before that (for extrapolation)
    gap: int = 1  # steps between those two computed steps
    since: int = 0  # steps since the last computed one
    measure: torch.Tensor | None = None  # first_block: the first blocks' residual; teacache: the probe
    accumulated: float = 0.0  # teacache: rescaled change since the last computed step


@dataclass
class StepCache:
    """A step cache's settings and its state during one denoising run.

    Args:
        threshold: skip while the measured change stays below this.
        warmup: the first `warmup` steps always compute.
        final: the last `final` steps always compute (they set the fine detail).
        max_in_row: at most this many skipped steps in a row (-1: no limit).
        compute_first: first_block: blocks that run on every step.
        extrapolate: add the residual extrapolated linearly from the last two computed steps
            (a first-order Taylor step), not the last one as it was.
        coefficients: teacache: polynomial (highest power first) mapping the probe's relative change
            to the output's; [1, 0] leaves it as it is. Fitted per model: see the model YAML.
    """

    kind: str = "first_block"
    threshold: float = 0.1
    warmup: int = 1
    final: int = 1
    max_in_row: int = -1
    compute_first: int = 1
    extrapolate: bool = False
    coefficients: tuple[float, ...] = (1.0, 0.0)
    steps: int = 0
    step_index: int = 0
    branch: str = "both"
    computed: int = 0
    cached: int = 0
    _branches: dict[str, _Branch] = field(default_factory=dict)

    def for_run(self, steps: int) -> "StepCache":
        """A cache with these settings and a fresh state, for one denoising run of `steps` steps."""
        run = replace(self, _branches={})
        run.begin(steps)
        return run

    def begin(self, steps: int) -> None:
        """A new denoising run of `steps` steps: forget the last run's residuals and counts."""
        self.steps, self.computed, self.cached = steps, 0, 0
        self._branches = {}

    def end(self) -> None:
        """The run is over: drop its residuals and measures (the counts stay for `stats`)."""
        self._branches = {}

    def at(self, step_index: int, branch: str) -> None:
        """The next transformer call is for this step and branch ('cond', 'uncond' or 'both')."""
        self.step_index, self.branch = step_index, branch

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold, "computed": self.computed, "cached": self.cached}

    def _may_skip(self, state: _Branch) -> bool:
        i = self.step_index
        return (state.residual is not None and i >= self.warmup and i < self.steps - self.final
                and (self.max_in_row < 0 or state.since < self.max_in_row))

    def _reused(self, state: _Branch) -> torch.Tensor:
        """The residual to add on a skipped step."""
        state.since += 1
        self.cached += 1
        if not self.extrapolate or state.previous is None:
            return state.residual
        slope = (state.residual - state.previous) / state.gap
        return state.residual + slope * state.since

    def _keep(self, state: _Branch, residual: torch.Tensor) -> None:
        if state.residual is not None:
            state.previous, state.gap = state.residual, state.since + 1
        state.residual, state.since = residual, 0
        self.computed += 1

    def __call__(self, run: RunBlocks, hidden: torch.Tensor, context: torch.Tensor, blocks: int,
                 probe: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks [0, blocks) over (hidden, context), or the cached residual in their place.
        On a skipped step the returned context is stale: the model must only read `hidden` after its blocks."""
        if self.kind == "teacache":
            reused = self.skip_all(probe())
            if reused is not None:
                return hidden + reused, context
            out_hidden, out_context = run(hidden, context, 0, blocks)
            self.ran_all(out_hidden - hidden)
            return out_hidden, out_context
        first = min(self.compute_first, blocks)
        head_hidden, head_context = run(hidden, context, 0, first)
        measure = head_hidden - hidden
        reused = self.skip_rest(measure)
        if reused is not None:
            return head_hidden + reused, head_context
        out_hidden, out_context = run(head_hidden, head_context, first, blocks)
        self.ran_rest(measure, out_hidden - head_hidden)
        return out_hidden, out_context

    def _state(self) -> _Branch:
        """What the branch of the call in progress remembers."""
        return self._branches.setdefault(self.branch, _Branch())

    # first_block's decision, shared by the native path (__call__) and declared blocks (block_cache.py)
    def skip_rest(self, measure: torch.Tensor) -> torch.Tensor | None:
        """first_block: given the first blocks' residual on this call, the residual to add in place of the
        remaining blocks (counted as cached), or None when they must run (then call `ran_rest`)."""
        state = self._state()
        if self._may_skip(state) and state.measure is not None and \
                relative_change(measure, state.measure) < self.threshold:
            return self._reused(state)
        return None

    def ran_rest(self, measure: torch.Tensor, residual: torch.Tensor) -> None:
        """first_block: the remaining blocks ran and added `residual`; keep it and the first blocks' `measure`."""
        state = self._state()
        state.measure = measure  # compared against the last computed step, so drift adds up
        self._keep(state, residual)

    # teacache's decision, shared by the native path (__call__) and declared blocks (block_cache.py)
    def skip_all(self, probe: torch.Tensor) -> torch.Tensor | None:
        """teacache: given this call's probe (the first block's modulated input), the residual to add in place of
        every block (counted as cached), or None when they must run (then call `ran_all`)."""
        state = self._state()
        if state.measure is not None:
            change = relative_change(probe, state.measure)
            state.accumulated += abs(sum(c * change ** p for p, c in enumerate(reversed(self.coefficients))))
        state.measure = probe
        if self._may_skip(state) and state.accumulated < self.threshold:
            return self._reused(state)
        state.accumulated = 0.0
        return None

    def ran_all(self, residual: torch.Tensor) -> None:
        """teacache: the blocks ran and added `residual`; keep it."""
        self._keep(self._state(), residual)


def _number(value: Any, key: str, low: float, high: float, integer: bool = False) -> list[str]:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (low <= value <= high) or \
            (not integer and not math.isfinite(value)):
        what = "a whole number" if integer else "a finite number"
        return [f"{key} must be {what} in [{low:g}, {high:g}], got {shown(value)}"]
    return []


def settings_problems(options: dict[str, Any], where: str) -> list[str]:
    """Every problem with a cache section (`where` names it: 'cache' or the model YAML's key)."""

    problems = [f"unknown key '{where}.{k}'" + (f" ({hint})" if (hint := did_you_mean(k, SETTINGS)) else
                                              f"; known: {', '.join(SETTINGS)}") for k in options if k not in SETTINGS]
    kind = options.get("kind", "none")
    if kind not in KINDS:
        problems.append(f"{where}.kind must be one of {', '.join(KINDS)}, got {shown(kind)}")
    checks = (("threshold", 0, 100, False), ("warmup", 0, 10_000, True), ("final", 0, 10_000, True),
              ("max_in_row", -1, 10_000, True), ("compute_first", 1, 10_000, True))
    for key, low, high, integer in checks:
        if options.get(key) is not None:
            problems += _number(options[key], f"{where}.{key}", low, high, integer)
    if options.get("extrapolate") is not None and not isinstance(options["extrapolate"], bool):
        problems.append(f"{where}.extrapolate must be true or false, got {shown(options['extrapolate'])}")
    coefficients = options.get("coefficients")
    if coefficients is not None and (not isinstance(coefficients, (list, tuple)) or not coefficients or any(
            isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) for c in coefficients)):
        problems.append(f"{where}.coefficients must be a non-empty list of finite numbers (highest power first), "
                        f"got {shown(coefficients)}")
    return problems


def make_step_cache(options: dict[str, Any] | None, model_settings: dict[str, Any] | None = None) -> StepCache | None:
    """The cache a run asks for (`cache.kind`), with the model YAML's settings for that kind under the run's:
    None for kind none. Raises DiffstageError listing every problem."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    problems = settings_problems(options, "cache")
    kind = options.get("kind", "none")
    if problems:
        raise DiffstageError("invalid step cache settings:\n" + "\n".join(f"  - {p}" for p in problems))
    ignored = [k for k in options if k != "kind" and k not in USED_BY[kind]]
    if ignored:
        one = len(ignored) == 1
        log.warning("%s: %s", ", ".join(f"cache.{k}={shown(options[k])}" for k in ignored),
                    f"no step cache is chosen, so {'it does' if one else 'they do'} nothing (add cache=teacache or "
                    "cache=first_block)" if kind == "none" else f"cache={kind} does not use {'it' if one else 'them'}")
    if kind == "none":
        return None
    merged = {**((model_settings or {}).get(kind) or {}), **options, "kind": kind}
    if "coefficients" in merged:
        merged["coefficients"] = tuple(float(c) for c in merged["coefficients"])
    return StepCache(**merged)
