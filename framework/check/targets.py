"""Targets and arguments: each dotted path resolved through the allowlist, each stage's arguments checked
against its class's __init__, and the module names stages refer to."""
from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..errors import DiffstageError, DisallowedPathError, did_you_mean, shown
from ..pretrained import module_kind
from ..resolve import ALLOWLIST_HINT, disallowed, is_allowed, resolve
from ..stage import PipelineStage
from .context import Context
from .records import StageContract


def stage_signature(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(parameters, type hints, accepts **kwargs) of a stage's __init__."""
    sig = inspect.signature(cls.__init__)
    params = {n: p for n, p in list(sig.parameters.items())[1:]
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)  # keep Field(ge=...)
    except Exception:  # unresolvable forward refs: skip type checks, keep name checks
        hints = {}
    return params, hints, var_kw


def resolve_target(ctx: Context, path: tuple, target: str, what: str, hint_from: Iterable[str] = ()) -> Any:
    """The object `target` names, or None after recording why not (allowlist first)."""
    if not is_allowed(target, ctx.allowlist):
        ctx.add(path, *disallowed(target, ctx.allowlist))
        return None
    try:
        return resolve(target, ctx.allowlist)
    except DisallowedPathError as e:
        ctx.add(path, str(e).split(" (")[0], hint=ALLOWLIST_HINT)
    except DiffstageError as e:
        ctx.add(path, f"{what}: {e}", hint=did_you_mean(target, hint_from))
    return None


def resolve_stage(ctx: Context, i: int, target: Any) -> type[PipelineStage] | None:
    """The class stages[i]'s `_target_` names, or None after recording why not."""
    path = ("stages", i, "_target_")
    if not isinstance(target, str):
        ctx.add(("stages", i), "stage has no `_target_` (the dotted path of its class)")
        return None
    names = [f"{c.__module__}.{c.__name__}" for c in ctx.known_stages]
    short = [f"diffstage.stages.{c.__name__}" for c in ctx.known_stages]
    cls = resolve_target(ctx, path, target, "unknown stage", short + names)
    if cls is None:
        return None
    if not (isinstance(cls, type) and issubclass(cls, PipelineStage)):
        ctx.add(path, f"'{target}' is not a PipelineStage subclass")
        return None
    return cls


def check_args(ctx: Context, i: int, cls: type[PipelineStage], args: dict) -> tuple[bool, set[str]]:
    """(all arguments valid, names of those whose values are invalid)."""
    params, hints, var_kw = stage_signature(cls)
    ok, bad = True, set()
    for name, value in args.items():
        path = ("stages", i, name)
        if name not in params:
            if not var_kw:
                ctx.add(path, f"unknown argument '{name}'", stage=cls.__name__,
                        hint=did_you_mean(name, params) or f"{cls.__name__} takes: {', '.join(params) or 'nothing'}")
                ok = False
            continue
        if cls.takes_all_modules and name in ("modules", "pipeline_class"):
            ctx.add(path, f"argument '{name}' is set by the builder (every loaded module, the checkpoint's "
                          "pipeline class), not by the YAML", stage=cls.__name__)
            ok = False
            continue
        if name in cls.module_params:
            if not isinstance(value, str):
                ctx.add(path, f"argument '{name}' must name a module (a string), got {shown(value)}",
                        stage=cls.__name__)
                bad.add(name)
            continue
        if name in hints and not _check_arg_value(ctx, path, hints[name], value, cls.__name__):
            bad.add(name)
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in args and name not in cls.module_params:
            ctx.add(("stages", i), f"missing required argument '{name}'", stage=cls.__name__)
            ok = False
    return ok and not bad, bad


def _not_json(value: Any) -> Any:
    raise TypeError(f"a YAML {type(value).__name__} value ({shown(value)}) cannot be a stage argument; "
                    "use a string, number, boolean, list or mapping")


def _value_at(value: Any, loc: tuple) -> Any:
    """The part of a YAML value that a pydantic error location points at (the whole value if unsure)."""
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return value
    return value


def _check_arg_value(ctx: Context, path: tuple, hint: Any, value: Any, stage: str) -> bool:
    """Strict, as JSON is: "16" is not an int and "no" is not a bool, so the stage gets exactly
    the value the YAML wrote (a list where it takes a tuple is fine, as is 1 for a float)."""
    try:
        adapter = TypeAdapter(hint)
    except Exception:  # a type pydantic cannot check (a custom class): names were checked
        return True
    try:
        text = json.dumps(value, default=_not_json)
    except (TypeError, ValueError) as e:
        ctx.add(path, str(e), stage=stage)
        return False
    try:
        adapter.validate_json(text, strict=True)
    except ValidationError as e:
        for err in e.errors():
            sub = path + tuple(err["loc"])
            ctx.add(sub, f"{err['msg']} (got {shown(_value_at(value, err['loc']))})", stage=stage)
        return False
    return True


def check_attention(ctx: Context) -> None:
    backend = ctx.data.get("attention")
    if isinstance(backend, str):
        from ..attention.backends import known_backends

        # a known name is enough here: whether it is installed matters only if the run uses it
        known = known_backends()
        if backend not in known:
            ctx.add(("attention",), f"unknown attention backend {shown(backend)}; known: {', '.join(known)}",
                    hint=did_you_mean(backend, known))


def check_module_refs(ctx: Context, entry: StageContract, modules: set[str]) -> None:
    """Every module the stage's arguments name is one the YAML declares."""
    for arg_path, module in entry.contract.modules.items():
        if module not in modules:
            declared = f"declared modules: {', '.join(sorted(modules))}" if modules else "no modules are declared"
            ctx.add(("stages", entry.index) + tuple(arg_path), f"unknown module '{module}'",
                    stage=entry.cls.__name__, hint=did_you_mean(module, modules) or declared)


def check_unused_modules(ctx: Context, modules: set[str], stages: list[StageContract]) -> None:
    used = {module for entry in stages for module in entry.contract.modules.values()}
    for name in sorted(modules - used):
        ctx.add(("modules", name), f"module '{name}' is listed but no stage uses it",
                hint="remove it, or reference it from a stage argument")


def check_module_targets(ctx: Context) -> None:
    """Each module's `_target_`, if the YAML gives one, names a class that can load a module."""
    for name, spec in ctx.mapping("modules").items():
        target = spec.get("_target_") if isinstance(spec, dict) else None
        if not isinstance(target, str):
            continue
        path = ("modules", name, "_target_")
        cls = resolve_target(ctx, path, target, "cannot resolve module class")
        if cls is not None:
            try:
                module_kind(cls)
            except DiffstageError as e:
                ctx.add(path, f"module '{name}': {e}")
