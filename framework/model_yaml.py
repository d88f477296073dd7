"""Read a model YAML, following `extends:` so a variant can be a few lines.

    extends: base_model      # a shipped model name, or a path relative to this file
    name: base_model_fast
    sampling: {num_inference_steps: 4}

Mappings merge key by key (the variant wins); lists and scalars are replaced
whole. Every key keeps the file and line it came from, for error messages."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DiffstageError, Problem, SpecError, shown
from .models_dir import available_models, is_path, looks_like_repo_id, model_yaml
from .yaml_lines import KeyPath, LineMap, load_yaml_with_lines


def _merge(base: Any, child: Any, path: KeyPath, replaced: set[KeyPath]) -> Any:
    if isinstance(base, dict) and isinstance(child, dict):
        out = dict(base)
        for key, value in child.items():
            out[key] = _merge(base.get(key), value, path + (key,), replaced) if key in base else value
            if key not in base or not (isinstance(base[key], dict) and isinstance(value, dict)):
                replaced.add(path + (key,))
        return out
    replaced.add(path)
    return child


def _base_file(ref: Any, child_file: Path, lines: LineMap) -> Path:
    if not isinstance(ref, str) or not ref:
        file, line = lines.where(("extends",))
        raise SpecError([Problem("`extends` must name a model or a YAML path", key="extends", file=file, line=line)])
    if is_path(ref):  # a path: relative to the file that says `extends`, never to the working directory
        ref = str(child_file.parent / ref)
    try:
        return model_yaml(ref)
    except DiffstageError as e:
        file, line = lines.where(("extends",))
        raise SpecError([Problem(f"cannot extend: {e}", key="extends", file=file, line=line)]) from None


def absolute_model_path(data: dict, file: Path) -> dict:
    """A relative `model_path` means relative to the YAML that says it (also when inherited), never to
    the working directory; 'org/name' with nothing of that name beside the YAML is a repo id."""
    path = data.get("model_path")
    if not isinstance(path, str) or not path or Path(path).expanduser().is_absolute():
        return data
    local = file.parent / path
    if looks_like_repo_id(path) and not local.exists():
        return data
    return {**data, "model_path": str(local.resolve())}


def load_model_yaml(file: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[Any, LineMap]:
    file = Path(file).resolve()
    data, lines = load_yaml_with_lines(file)
    if isinstance(data, dict):
        data = absolute_model_path(data, file)
    if not (isinstance(data, dict) and "extends" in data):
        return data, lines
    base_file = _base_file(data["extends"], file, lines)
    if base_file in _chain + (file,):
        chain = " -> ".join(p.name for p in _chain + (file, base_file))
        f, line = lines.where(("extends",))
        raise SpecError([Problem(f"`extends` forms a cycle: {chain}", key="extends", file=f, line=line)])
    base, base_lines = load_model_yaml(base_file, _chain + (file,))
    if not isinstance(base, dict):
        f, line = lines.where(("extends",))
        raise SpecError([Problem(f"cannot extend '{base_file}': it holds {type(base).__name__} "
                                 f"{shown(base)}, not a model YAML mapping", key="extends", file=f, line=line)])
    child = {k: v for k, v in data.items() if k != "extends"}
    replaced: set[KeyPath] = set()
    merged = _merge(base, child, (), replaced)
    return merged, base_lines.overlay(lines, replaced)


def describe_models() -> list[tuple[str, str, str]]:
    """(name, task, description) of each shipped model (`extends` followed), tolerant of broken files."""
    out = []
    for name, path in available_models().items():
        try:
            data, _ = load_model_yaml(path)
        except DiffstageError as e:
            out.append((name, "?", f"(unreadable: {str(e).splitlines()[-1].strip()})"))
            continue
        data = data if isinstance(data, dict) else {}
        desc, task = str(data.get("description", "")), str(data.get("task", "?"))
        if data.get("pipeline_name") == "*":  # it runs the checkpoint's own pipeline, whatever that makes
            task = "any"
        out.append((name, task, " ".join(desc.split())))
    return out
