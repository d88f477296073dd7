"""A module's forward arguments by name, for the acceleration declarations that name them (block_cache,
block_probe, distributed/split_plan): one reading of the signature, one error text."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .errors import DiffstageError

Locate = Callable[[tuple], str]  # key path under the declaration -> "file:line: acceleration.NAME.KEY"
Arguments = dict[str, tuple[int | None, Any]]  # name -> (position in a call, None if keyword-only; default)


def forward_arguments(module: torch.nn.Module) -> Arguments:
    """The arguments of `module`'s class's forward, without self, *args and **kwargs."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # without self
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: (i if p.kind in positional else None, None if p.default is p.empty else p.default)
            for i, p in enumerate(params) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def require_argument(module: torch.nn.Module, arguments: Arguments, name: str, at: str) -> None:
    """DiffstageError at `at` when `name` is not one of `arguments` (module's forward's)."""
    if name not in arguments:
        raise DiffstageError(f"{at}: {type(module).__name__}.forward takes no argument {name!r} "
                             f"(it takes {', '.join(arguments)})")


def argument(name: str, args: tuple, kwargs: dict, arguments: Arguments) -> Any:
    """The value `name` has in a call made with `args` and `kwargs` (its default when not given)."""
    if name in kwargs:
        return kwargs[name]
    position, default = arguments[name]
    return args[position] if position is not None and position < len(args) else default


def missing_argument(module: Any, **names: str) -> str | None:
    """What is wrong when `module`'s forward takes no argument of one of `names` (setting -> argument name),
    as the stage setting it would hear it (a UNet takes `sample`: latents_arg: sample); None when it takes
    them all, takes **kwargs, or is not a module."""
    if not isinstance(module, torch.nn.Module):
        return None
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    taken = [p.name for p in params if p.kind is not p.VAR_POSITIONAL]
    for setting, name in names.items():
        if name not in taken:
            return (f"{type(module).__name__}.forward takes no argument {name!r} (it takes {', '.join(taken)}): set "
                    f"{setting} to the name it gives that input")
    return None
