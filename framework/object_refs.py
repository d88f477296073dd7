"""How a PipelineBuilder names the Python objects it is given, and turns Python values into YAML data.

A stage class or callback given as an object goes into the model data by its import path (so the data
can be written as YAML), or, without one (a function defined inside a function), by a `python:` name
that only the builder that holds the object resolves."""
from __future__ import annotations

import sys
from typing import Any

from .errors import DiffstageError, shown
from .stage import PipelineStage

UNSAVED = "python:"  # prefix of the names of objects that have no import path


def plain_data(value: Any) -> Any:
    """`value` as YAML data: tuples become lists, pydantic models their mappings."""
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return plain_data(value.model_dump(by_alias=True, exclude_defaults=True))
    return value


def import_path(obj: Any) -> str | None:
    """The dotted path that names `obj` in its (already imported) module, or None if there is none."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname or module == "__main__":
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}.{qualname}" if found is obj else None


def reference(objects: dict[str, Any], obj: Any, what: str) -> str:
    """The name `obj` goes by in the model data: a dotted path as given, else the object's import path (or,
    without one, a `python:` name); recorded in `objects` (name -> object) so the builder resolves it."""
    if isinstance(obj, str):
        return obj
    if not callable(obj):
        raise DiffstageError(f"a {what} must be callable or a dotted path, got {shown(obj)}")
    name = import_path(obj)
    if name is None:
        base = f"{UNSAVED}{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
        name, n = base, 1
        while name in objects and objects[name] is not obj:
            n += 1
            name = f"{base}#{n}"
    objects[name] = obj
    return name


def references(data: dict[str, Any], stage_names: list[str]) -> list[tuple[str, str]]:
    """(where, name) of every dotted path in the model data: stage targets, callbacks, module classes."""
    stages = data.get("stages") or []
    out = [(f"stages[{i}] ({n})._target_", e["_target_"]) for i, (e, n) in
           enumerate(zip(stages, stage_names)) if isinstance(e, dict) and isinstance(e.get("_target_"), str)]
    for group, entries in (data.get("pipeline_config") or {}).get("callbacks", {}).items():
        out += [(f"callback {group}.{name}", target) for name, target in (entries or {}).items()
                if isinstance(target, str)]
    out += [(f"module {name}", spec["_target_"]) for name, spec in (data.get("modules") or {}).items()
            if isinstance(spec, dict) and isinstance(spec.get("_target_"), str)]
    return out


def stage_entry(objects: dict[str, Any], stage: Any, args: dict, name: str | None) -> dict[str, Any]:
    """A stage's entry in the model data: `_target_` (and `_name_`), then its arguments."""
    if isinstance(stage, PipelineStage):  # an instance: its class and what it was made with
        cls = type(stage)
        made = {k: v for k, v in stage.init_args.items() if not (k in cls.module_params and not isinstance(v, str))}
        entry = {"_target_": reference(objects, cls, "stage class"), **plain_data(made)}
    elif isinstance(stage, type) and issubclass(stage, PipelineStage):
        entry = {"_target_": reference(objects, stage, "stage class")}
    elif isinstance(stage, str):
        entry = {"_target_": stage}
    else:
        raise DiffstageError(f"a stage is a PipelineStage class, an instance of one or a dotted path, got "
                             f"{shown(stage)}")
    entry.update(plain_data(args))
    if name is not None:
        entry = {"_target_": entry.pop("_target_"), "_name_": name, **entry}
    return entry
