"""Callbacks: the groups and names `pipeline_config.callbacks` binds, checked against what the stages call,
each target through the callback allowlist, and the fields bound callbacks declare they read (@reads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..callbacks import declared_reads
from ..errors import DiffstageError, did_you_mean, shown
from ..resolve import CALLBACK_HINT, is_allowed, resolve
from ..stage import CallbackSpec, accepts_positional
from .context import Context
from .records import StageContract
from .targets import resolve_target

BASE = ("pipeline_config", "callbacks")  # where the YAML binds callbacks


@dataclass(frozen=True)
class CallbackRead:
    """A field a bound callback declares it reads."""

    field: str
    path: tuple  # the YAML key that binds the callback
    callback: str  # group.name
    optional: bool


@dataclass(frozen=True)
class CalledCallback:
    """A callback a stage of the pipeline calls: its spec and the (first) stage class calling it."""

    spec: CallbackSpec
    stage: str


def called_callbacks(stages: list[StageContract]) -> dict[str, dict[str, CalledCallback]]:
    """Callback group -> {name: the callback}, for every group a stage of the pipeline belongs to."""
    called: dict[str, dict[str, CalledCallback]] = {}
    for entry in stages:
        group = called.setdefault(entry.cls.callback_group(), {})
        for spec in entry.contract.callbacks:
            group.setdefault(spec.name, CalledCallback(spec, entry.cls.__name__))
    return called


def callback_reads(ctx: Context, entry: StageContract, given: dict) -> list[CallbackRead]:
    """What the stage's bound callbacks declare they read (@reads); a default callback (the stage's own
    method) is covered by the stage's contract."""
    group = entry.cls.callback_group()
    entries = given.get(group) if isinstance(given.get(group), dict) else {}
    out = []
    for spec in entry.contract.callbacks:
        target = entries.get(spec.name)
        if not isinstance(target, str) or not is_allowed(target, ctx.callbacks):
            continue  # reported by the callback checks
        try:
            fn = resolve(target, ctx.callbacks)
        except DiffstageError:
            continue  # reported by the callback checks
        needed, optional = declared_reads(fn)
        path = BASE + (group, spec.name)
        out += [CallbackRead(f, path, f"{group}.{spec.name}", False) for f in sorted(needed)]
        out += [CallbackRead(f, path, f"{group}.{spec.name}", True) for f in sorted(optional - needed)]
    return out


def check_callbacks(ctx: Context, given: dict, called: dict[str, dict[str, CalledCallback]],
                    certain: bool) -> None:
    """Each bound callback is one a stage calls, and each required one is bound."""
    for group, entries in given.items():
        if not isinstance(entries, dict):
            continue  # the schema check reports the type
        known_group = group in called
        if not known_group and certain:
            with_callbacks = sorted(g for g, specs in called.items() if specs)
            ctx.add(BASE + (group,), f"no stage in this pipeline calls callbacks of group '{group}'",
                    hint=did_you_mean(group, with_callbacks) or
                    f"groups used here: {', '.join(with_callbacks) or 'none'}")
        for name, target in entries.items():
            path = BASE + (group, name)
            callback = called.get(group, {}).get(name)
            if known_group and callback is None:
                ctx.add(path, f"callback '{name}' is not called by any stage of group '{group}'",
                        hint=did_you_mean(name, called[group]) or
                        f"callbacks of '{group}': {', '.join(sorted(called[group]))}")
            # Targets are checked even when the group is unknown: the allowlist comes first.
            _check_target(ctx, path, callback, target)
    for group, callbacks in called.items():
        bound = given.get(group) or {}
        if not isinstance(bound, dict):
            continue  # the schema check reports the type
        for name, callback in callbacks.items():
            if callback.spec.required and name not in bound:
                spec = callback.spec
                ctx.add(BASE + (group,), f"missing required callback '{group}.{name}'", stage=callback.stage,
                        hint=f"signature: {name}({', '.join(spec.params)}); {spec.doc}".rstrip("; "))


def _check_target(ctx: Context, path: tuple, callback: CalledCallback | None, target: Any) -> None:
    """The target resolves through the callback allowlist to something the stage can call."""
    if not isinstance(target, str):
        return
    if is_allowed(target, ctx.allowlist) and not is_allowed(target, ctx.callbacks):
        ctx.add(path, f"{shown(target)} cannot be a callback: {CALLBACK_HINT}")
        return
    fn = resolve_target(ctx, path, target, "cannot resolve callback")
    if fn is None:
        return
    if not callable(fn):
        ctx.add(path, f"'{target}' is not callable")
    elif callback is not None and not accepts_positional(fn, len(callback.spec.params)):
        spec = callback.spec
        ctx.add(path, f"callback '{target}' cannot be called as {spec.name}({', '.join(spec.params)})",
                stage=callback.stage)
