"""TeaCache's measure on a stock transformer: the module its model YAML names as `acceleration.NAME.probe`.

A native transformer computes the first block's timestep-modulated input itself (`cache_probe`). A stock one
computes it inside its own forward, so the engine hooks the module that produces it (or takes it as an
argument) and hands each value to the cached call in progress (block_cache.py). The hook is on the shared
module for good; it hands values on only while a cached call of this declaration runs.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .errors import DiffstageError
from .forward_args import Locate, argument, forward_arguments, require_argument

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


def attach_probe(module: torch.nn.Module, declared: Any, locate: Locate,
                 seen: Callable[[Any], None]) -> RemovableHandle:
    """Hook the probe `declared` (acceleration_spec.ProbeSpec) names in `module`: each call of it gives `seen` its
    output (the first item of a tuple) or its argument `declared.input`. Checked here, before the first run."""
    probe = probe_module(module, declared.module, locate)
    if declared.input is None:
        def output_hook(_module, _args, out):
            seen(out[0] if isinstance(out, (tuple, list)) and out else out)

        return probe.register_forward_hook(output_hook)
    arguments = forward_arguments(probe)
    require_argument(probe, arguments, declared.input, locate(("probe", "input")))

    def input_hook(_module, args, kwargs):
        seen(argument(declared.input, args, kwargs, arguments))

    return probe.register_forward_pre_hook(input_hook, with_kwargs=True)
