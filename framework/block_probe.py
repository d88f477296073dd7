"""TeaCache's measure on a stock transformer: the module its model YAML names as `acceleration.NAME.probe`.

A native transformer computes the first block's timestep-modulated input itself (`cache_probe`). A stock one
computes it inside its own forward, so the engine hooks the module that produces it (or takes it as an
argument) and hands each value to the cached call in progress (block_cache.py). The hook is on the shared
module for good; it hands values on only while a cached call of this declaration runs.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .errors import DiffstageError

Locate = Callable[[tuple], str]  # key path under the declaration -> "file:line: acceleration.NAME.KEY"


def probe_module(module: torch.nn.Module, path: str, locate: Locate) -> torch.nn.Module:
    """The module at `path` inside `module`; DiffstageError at `probe` naming what is there instead."""
    found: torch.nn.Module = module
    walked: list[str] = []
    for part in path.split("."):
        children = dict(found.named_children())
        if part not in children:
            where = ".".join(walked) or type(module).__name__
            close = difflib.get_close_matches(part, list(children), n=1, cutoff=0.6)  # among this level's names
            hint = f"did you mean '{'.'.join([*walked, close[0]])}'?" if close else None
            raise DiffstageError(f"{locate(('probe',))}: {type(module).__name__} has no module {path!r} ("
                                 + (hint if hint else f"{where} holds: {', '.join(children) or 'nothing'}") + ")")
        found = children[part]
        walked.append(part)
    return found


def _positions(probe: torch.nn.Module, name: str, locate: Locate) -> tuple[int | None, Any]:
    """Where the argument `name` of the probe module's forward comes in a call: (position, default)."""
    params = list(inspect.signature(type(probe).forward).parameters.values())[1:]  # without self
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for i, p in enumerate(named):
        if p.name == name:
            positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            return (i if positional else None), (None if p.default is p.empty else p.default)
    raise DiffstageError(f"{locate(('probe', 'input'))}: {type(probe).__name__}.forward takes no argument {name!r} "
                         f"(it takes {', '.join(p.name for p in named)})")


def attach_probe(module: torch.nn.Module, declared: Any, locate: Locate,
                 seen: Callable[[Any], None]) -> RemovableHandle:
    """Hook the probe `declared` (acceleration_spec.ProbeSpec) names in `module`: each call of it gives `seen` its
    output (the first item of a tuple) or its argument `declared.input`. Checked here, before the first run."""
    probe = probe_module(module, declared.module, locate)
    if declared.input is None:
        def output_hook(_module, _args, out):
            seen(out[0] if isinstance(out, (tuple, list)) and out else out)

        return probe.register_forward_hook(output_hook)
    position, default = _positions(probe, declared.input, locate)

    def input_hook(_module, args, kwargs):
        if declared.input in kwargs:
            seen(kwargs[declared.input])
        else:
            seen(args[position] if position is not None and position < len(args) else default)

    return probe.register_forward_pre_hook(input_hook, with_kwargs=True)
