"""Step caches on a stock transformer, through the blocks its model YAML declares (`acceleration:`).

A native transformer takes the step cache as an argument and routes its blocks through it (step_cache.py).
A stock Diffusers class runs its own loop (`for block in self.blocks: ...`), so the engine wraps each
declared block instance instead: during a transformer call made with a cache (`cached_blocks`), the first
`compute_first` blocks run, StepCache decides from the change of their residual, and on a skipped call the
remaining blocks hand their inputs through and the last one adds the cached residual to the hidden states.
cache=teacache decides from the declared `probe` (block_probe.py) instead, before any block computes: when the
probe runs inside the first block, a skip stops that block there (the hook raises _SkipBlocks), so a skipped
call costs the modulation, not a block.

The cache of the call is a context variable, not an attribute of the module: pipelines running in other
threads share the loaded transformer. With no cache active a wrapped block calls its class's forward as it
is (the same computation; one context-variable read per block). Only instances are wrapped, never a class.
"""
from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from .block_probe import attach_probe
from .errors import DiffstageError, did_you_mean
from .forward_args import Arguments, Locate, argument, forward_arguments, require_argument
from .step_cache import StepCache, takes_step_cache

PLAN = "_diffstage_block_plan"  # attribute of a wrapped transformer: its BlockPlan
SLOT = "_diffstage_block_slot"  # attribute of a wrapped block: (plan, index, argument positions)


@dataclass(eq=False)
class BlockPlan:
    """The declared blocks of one transformer and where their residual stream is."""

    count: int  # blocks over all declared lists
    input: str  # the forward argument with the hidden states
    returns: tuple[str, ...] | None  # a tuple's items by argument name; None: a single tensor
    declared: str  # "file:line: acceleration.NAME.residual.returns", for errors seen on a call
    order: str  # "file:line: acceleration.NAME.blocks"
    signature: tuple = field(default=())  # what was declared (a second install of the same is a no-op)
    probe: str | None = None  # teacache: "file:line: acceleration.NAME.probe" when a probe is declared
    hook: Any = None  # the probe's hook (removed when another declaration is installed on the module)

    def hidden(self, out: Any, block: torch.nn.Module) -> torch.Tensor:
        if self.returns is None and isinstance(out, torch.Tensor):
            return out
        if self.returns is not None and isinstance(out, (tuple, list)) and len(out) == len(self.returns):
            return out[self.returns.index(self.input)]
        got = f"a tuple of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        said = f"[{', '.join(self.returns)}]" if self.returns else f"a single tensor ({self.input})"
        raise DiffstageError(f"{self.declared}: {type(block).__name__} returned {got}, but the declaration says {said}")

    def with_hidden(self, out: Any, hidden: torch.Tensor) -> Any:
        if self.returns is None:
            return hidden
        return tuple(hidden if name == self.input else item for name, item in zip(self.returns, out))


@dataclass
class _Call:
    """One transformer call made with a step cache: where it is in the blocks, what the first ones added."""

    cache: StepCache
    plan: BlockPlan
    next: int = 0
    start: torch.Tensor | None = None  # hidden states into the first block
    head: torch.Tensor | None = None  # hidden states out of the first `compute_first` blocks
    measure: torch.Tensor | None = None
    reused: torch.Tensor | None = None  # a skipped call: the residual to add after the last block
    probe: torch.Tensor | None = None  # teacache: the probe's value, when it ran before the first block
    decided: bool = False  # teacache: this call's decision is taken
    inside: int | None = None  # the block whose forward is running

    # Under runtime.compile (blocks compiled one at a time) this bookkeeping runs eagerly, as one frame: traced,
    # it would be recompiled for every block index and cache state. The block's own forward is still compiled.
    @torch.compiler.disable(recursive=False)
    def run(self, block: torch.nn.Module, index: int, params: dict, args: tuple, kwargs: dict) -> Any:
        plan, teacache = self.plan, self.cache.kind == "teacache"
        if index != self.next:
            raise DiffstageError(f"{plan.order}: block {index} of the declared lists ran when block {self.next} "
                                 "was next: declare `blocks` in the order the forward runs them, each once a call")
        if index == 0:
            self.start, self.reused = argument(plan.input, args, kwargs, params), None
            if teacache and self.probe is not None:  # the probe ran before the blocks
                self.decide(self.probe)
        out = self._block(block, index, params, args, kwargs)
        if teacache and not self.decided:
            raise DiffstageError(f"{plan.probe}: the probe did not run before the first declared block returned: "
                                 "name a module that runs before the blocks or inside the first one")
        if not teacache and index == min(self.cache.compute_first, plan.count) - 1:
            self.head = plan.hidden(out, block)
            self.measure = self.head - self.start
            self.reused = self.cache.skip_rest(self.measure)
        if index == plan.count - 1:
            hidden = plan.hidden(out, block)
            if self.reused is not None:
                out = plan.with_hidden(out, hidden + self.reused)
            elif teacache:
                self.cache.ran_all(hidden - self.start)
            else:
                self.cache.ran_rest(self.measure, hidden - self.head)
            self.decided = False  # the call is over (a next one in the same context decides afresh)
        self.next = (index + 1) % plan.count
        return out

    def _block(self, block: torch.nn.Module, index: int, params: dict, args: tuple, kwargs: dict) -> Any:
        """The block's output; on a skipped call, its inputs handed through."""
        if self.reused is None:
            self.inside = index
            try:
                return type(block).forward(block, *args, **kwargs)
            except _SkipBlocks:  # the probe inside this (first) block decided to skip the call
                pass
            finally:
                self.inside = None
        if self.plan.returns is None:
            return argument(self.plan.input, args, kwargs, params)
        return tuple(argument(n, args, kwargs, params) for n in self.plan.returns)

    def decide(self, probe: Any) -> None:
        """teacache: this call's probe value; skip or run the blocks (at its first value of the call)."""
        if not isinstance(probe, torch.Tensor):
            raise DiffstageError(f"{self.plan.probe}: the probe gave {type(probe).__name__}, not a tensor to measure")
        self.probe, self.decided = None, True
        self.reused = self.cache.skip_all(probe)

    def probed(self, value: Any) -> None:
        """The probe module ran (its hook). Before the blocks: kept for the first block. Inside the first block:
        decided now, and a skip stops that block."""
        if self.decided or self.cache.kind != "teacache":
            return
        if self.inside is None:
            self.probe = value
        elif self.inside == 0:
            self.decide(value)
            if self.reused is not None:
                raise _SkipBlocks


class _SkipBlocks(Exception):
    """Raised by the probe's hook inside the first block when teacache skips the call."""


ACTIVE: ContextVar[_Call | None] = ContextVar("diffstage_block_cache", default=None)


def _forward(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A declared block's forward: its class's, unless a cached call of its transformer is in progress."""
    call = ACTIVE.get()
    plan, index, params = block.__dict__[SLOT]
    if call is None or call.plan is not plan:
        return type(block).forward(block, *args, **kwargs)
    return call.run(block, index, params, args, kwargs)


@contextmanager
def cached_blocks(transformer: Any, cache: StepCache | None) -> Iterator[None]:
    """The transformer calls inside run with `cache` through their declared blocks (None: as they are)."""
    if cache is None:
        yield
        return
    token = ACTIVE.set(_Call(cache, getattr(transformer, PLAN)))
    try:
        yield
    finally:
        ACTIVE.reset(token)


def step_cache_route(transformer: Any, kind: str, declared: bool) -> str:
    """How `transformer` takes a step cache of `kind`: 'argument' (native) or 'blocks' (`declared`: its model
    YAML declares its blocks and they are wrapped); ValueError when it cannot."""
    name = type(transformer).__name__
    if takes_step_cache(transformer):
        return "argument"
    if not (declared and hasattr(transformer, PLAN)):
        raise ValueError(f"cache={kind}: {name} does not support step caches (diffstage's native transformers take "
                         "a `step_cache` argument; for a stock transformer, declare its blocks and residual stream "
                         "under `acceleration.<module>` in the model YAML for cache=first_block, and a `probe` for "
                         "cache=teacache: see the README's \"Adding a model\"; a model without one chain of "
                         "repeated blocks, such as a UNet, cannot take them); use cache=none")
    if kind == "teacache" and getattr(transformer, PLAN).probe is None:
        raise ValueError(f"cache={kind}: {name} takes step caches through its declared blocks, but its declaration "
                         "names no `probe` (the module whose output is the first block's modulated input, which "
                         "cache=teacache measures): declare `acceleration.<module>.probe`, or use cache=first_block")
    return "blocks"


def block_lists(module: torch.nn.Module, declared: list[str] | None, locate: Locate) -> list[torch.nn.ModuleList]:
    """The declared ModuleLists of `module` (default: those holding its `_repeated_blocks` classes)."""
    cls = type(module).__name__
    lists = {n: m for n, m in module.named_modules() if n and isinstance(m, torch.nn.ModuleList)}
    top = ", ".join(n for n in lists if "." not in n) or "none"  # nested lists (dotted) are found, not listed
    if declared is None:
        repeated = set(getattr(module, "_repeated_blocks", None) or ())
        found = [m for n, m in lists.items() if "." not in n and len(m) and type(m[0]).__name__ in repeated]
        if not found:
            said = f"names {sorted(repeated)} in _repeated_blocks, held by none of its" if repeated else \
                "declares no _repeated_blocks to find them by; its"
            raise DiffstageError(f"{locate(())}: declare `blocks`: {cls} {said} module lists ({top})")
        return found
    for name in declared:
        if name not in lists:
            hint = did_you_mean(name, lists)
            raise DiffstageError(f"{locate(('blocks',))}: {cls} has no module list {name!r}"
                                 + (f" ({hint})" if hint else f" (it has: {top})"))
    return [lists[name] for name in declared]


def _parameters(block: torch.nn.Module, residual: Any, locate: Locate) -> Arguments:
    """The block forward's arguments by name: (position, default); every declared name must be one."""
    out = forward_arguments(block)
    returns = [residual.returns] if isinstance(residual.returns, str) else residual.returns
    for key, names in (("input", [residual.input]), ("returns", returns)):
        for name in names:
            require_argument(block, out, name, locate(("residual", key)))
    return out


def install_block_cache(module: torch.nn.Module, declaration: Any, locate: Locate) -> None:
    """Check `declaration` (spec.AccelerationSpec) against the loaded `module` and, when it declares the residual
    stream, wrap its blocks for cache=first_block (and hook its `probe` for cache=teacache). DiffstageError at
    `locate(key)` for what does not fit."""
    blocks = [b for blocks in block_lists(module, declaration.blocks, locate) for b in blocks]
    residual = declaration.residual
    if residual is None:
        return
    probe = declaration.probe
    signature = (tuple(map(id, blocks)), residual.input, str(residual.returns), probe and probe.model_dump_json())
    old = getattr(module, PLAN, None)
    if getattr(old, "signature", None) == signature:
        return  # a module from the session's cache, wrapped by another pipeline's build with the same declaration
    params = {cls: _parameters(b, residual, locate) for cls, b in {type(b): b for b in blocks}.items()}
    returns = None if isinstance(residual.returns, str) else tuple(residual.returns)
    plan = BlockPlan(len(blocks), residual.input, returns, locate(("residual", "returns")), locate(("blocks",)),
                     signature, probe=locate(("probe",)) if probe else None)
    if probe is not None:
        plan.hook = attach_probe(module, probe, locate, lambda value: _probed(plan, value))
    if old is not None and old.hook is not None:
        old.hook.remove()
    for index, block in enumerate(blocks):
        block.__dict__[SLOT] = (plan, index, params[type(block)])
        block.forward = types.MethodType(_forward, block)  # this instance only; deepcopy rebinds it
    setattr(module, PLAN, plan)


@torch.compiler.disable  # bookkeeping (a hook inside a compiled block), never traced
def _probed(plan: BlockPlan, value: Any) -> None:
    """The probe hook of `plan`: hands the value to the cached call of this plan in progress, if any."""
    call = ACTIVE.get()
    if call is not None and call.plan is plan:
        call.probed(value)
