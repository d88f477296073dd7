"""A stock module's sequence split for parallel.ulysses / parallel.ring, from its model YAML's declaration
(`acceleration.NAME.sequence`) or, by default, the `_cp_plan` Diffusers puts on the class.

The plan names module paths inside the module: the inputs to split as a module is called (the hidden
states as the first block takes them, a mask as every block does), the outputs to split as a module returns
(rotary embeddings computed for every token), and the module whose output is gathered (the last projection).
Hooks on those instances do it, and only inside `split_sequence(module, state)`: otherwise the shared module
runs as it is. Attention in between runs across the ranks through attention/route.py."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from ..acceleration_spec import SequenceSpec, SplitSpec
from ..errors import DiffstageError, did_you_mean
from ..forward_args import Arguments, Locate, forward_arguments, require_argument
from .sequence import gather_output, shard
from .state import ParallelState

PLAN = "_diffstage_sequence_plan"  # attribute of a module with a split plan installed: its SequencePlan
_SPLITTING: ContextVar[ParallelState | None] = ContextVar("diffstage_sequence_split", default=None)


@dataclass(eq=False)
class SequencePlan:
    spec: SequenceSpec
    source: str  # "file:line: acceleration.NAME.sequence", or "ClassName._cp_plan"
    handles: list = field(default_factory=list)  # the hooks, removed if another declaration replaces this one


def from_cp_plan(module: torch.nn.Module) -> SequenceSpec | None:
    """The class's Diffusers `_cp_plan` as a SequenceSpec (None without one). Read by attribute names, so no
    Diffusers internals are imported."""
    plan = getattr(type(module), "_cp_plan", None)
    if not plan:
        return None
    inputs, outputs, gather = {}, {}, {}
    for path, entry in plan.items():
        if hasattr(entry, "gather_dim"):
            gather[path] = entry.gather_dim
            continue
        if not isinstance(entry, dict):
            raise DiffstageError(f"{type(module).__name__}._cp_plan[{path!r}] holds {type(entry).__name__}, which "
                                 "diffstage does not read; declare acceleration.<module>.sequence in the model YAML "
                                 "instead")
        for key, split in entry.items():
            if not hasattr(split, "split_dim"):
                raise DiffstageError(f"{type(module).__name__}._cp_plan[{path!r}][{key!r}] holds "
                                     f"{type(split).__name__}, which diffstage does not read; declare "
                                     "acceleration.<module>.sequence in the model YAML instead")
            spec = SplitSpec(dim=split.split_dim, ndim=split.expected_dims)
            (outputs if split.split_output else inputs).setdefault(path, {})[key] = spec
    return SequenceSpec(inputs=inputs, outputs=outputs, gather=gather)


def _matching(module: torch.nn.Module, path: str) -> list[tuple[str, torch.nn.Module]]:
    """The submodules at `path` ('' the module itself; '*' matches any one name or index)."""
    if path == "":
        return [("", module)]
    want = path.split(".")
    return [(name, m) for name, m in module.named_modules() if name and len(name.split(".")) == len(want)
            and all(w in ("*", n) for w, n in zip(want, name.split(".")))]


def _as_split(value: Any) -> SplitSpec:
    return value if isinstance(value, SplitSpec) else SplitSpec(dim=value)


def _split(value: Any, split: SplitSpec, name: str, state: ParallelState) -> Any:
    if not isinstance(value, torch.Tensor) or (split.ndim is not None and value.dim() != split.ndim):
        return value
    return shard(value, split.dim, name, state)


def _input_hook(splits: dict[str, SplitSpec], arguments: Arguments):
    def hook(_module, args, kwargs):
        state = _SPLITTING.get()
        if state is None:
            return None
        args = list(args)
        for name, split in splits.items():
            if name in kwargs:
                kwargs[name] = _split(kwargs[name], split, name, state)
            elif arguments[name][0] is not None and arguments[name][0] < len(args):
                args[arguments[name][0]] = _split(args[arguments[name][0]], split, name, state)
        return tuple(args), kwargs
    return hook


def _output_hook(splits: dict[int, SplitSpec], path: str):
    def hook(_module, _args, out):
        state = _SPLITTING.get()
        if state is None:
            return None
        if isinstance(out, torch.Tensor):
            return _split(out, splits[0], f"{path} output", state) if 0 in splits else out
        items = list(out)
        for index, split in splits.items():
            items[index] = _split(items[index], split, f"{path} output {index}", state)
        return type(out)(items) if isinstance(out, tuple) else items
    return hook


def _gather_hook(dim: int):
    def hook(_module, _args, out):
        state = _SPLITTING.get()
        return None if state is None else gather_output(out, dim, state)
    return hook


def _where(module: torch.nn.Module, path: str, at: str) -> list[tuple[str, torch.nn.Module]]:
    found = _matching(module, path)
    if not found:
        names = [n for n, _ in module.named_modules() if n and "." not in n]
        hint = did_you_mean(path.split(".")[0], names)
        raise DiffstageError(f"{at}: {type(module).__name__} has no module {path!r}"
                             + (f" ({hint})" if hint else f" (its modules: {', '.join(names)})"))
    return found


def install_sequence_plan(module: torch.nn.Module, declared: SequenceSpec | None, locate: Locate) -> bool:
    """Check the split plan (`declared`, else the class's _cp_plan) against the loaded `module` and hook it in;
    False when there is none. DiffstageError at `locate(key)` for a path or argument that is not there."""
    spec = declared or from_cp_plan(module)
    if spec is None:
        return False
    source = locate(("sequence",)) if declared else f"{type(module).__name__}._cp_plan (Diffusers)"
    old = getattr(module, PLAN, None)
    if old is not None and old.spec == spec:
        return True  # a module from the session's cache, hooked by another build with the same plan
    at = (lambda *key: locate(("sequence", *key))) if declared else (lambda *key: source)
    hooks = []  # (module, kind, hook): checked whole before any is registered
    for path, splits in spec.inputs.items():
        for name, m in _where(module, path, at("inputs", path)):
            arguments = forward_arguments(m)
            for argument_name in splits:
                require_argument(m, arguments, argument_name, at("inputs", path, argument_name))
            hooks.append((m, "pre", _input_hook({a: _as_split(s) for a, s in splits.items()}, arguments)))
    for path, splits in spec.outputs.items():
        hooks += [(m, "post", _output_hook({i: _as_split(s) for i, s in splits.items()}, name))
                  for name, m in _where(module, path, at("outputs", path))]
    for path, dim in spec.gather.items():
        hooks += [(m, "post", _gather_hook(dim)) for _, m in _where(module, path, at("gather", path))]
    handles = [m.register_forward_pre_hook(h, with_kwargs=True) if kind == "pre" else m.register_forward_hook(h)
               for m, kind, h in hooks]
    if old is not None:
        for handle in old.handles:
            handle.remove()
    setattr(module, PLAN, SequencePlan(spec, source, handles))
    return True


@contextlib.contextmanager
def split_sequence(module: torch.nn.Module, state: ParallelState) -> Iterator[None]:
    """Calls of `module` inside run on this rank's share of the sequence, by its installed plan."""
    if not hasattr(module, PLAN):
        raise DiffstageError(f"{type(module).__name__} has no sequence split plan installed")
    token = _SPLITTING.set(state)
    try:
        yield
    finally:
        _SPLITTING.reset(token)
