"""Find model YAMLs: by name among the shipped ones, or by path for a user's own."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import DiffstageError, did_you_mean, shown


def shipped_models_dir() -> Path:
    return Path(str(resources.files("diffstage.pipelines_yaml")))


def available_models() -> dict[str, Path]:
    """Shipped model name -> YAML file."""
    return {p.stem: p for p in sorted(shipped_models_dir().glob("*.yaml"))}


def is_path(name_or_path: str) -> bool:
    return name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path or "/" in name_or_path


def looks_like_repo_id(path: str) -> bool:
    """'org/name', as Hugging Face repo ids are (a local path of that shape is checked first)."""
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and os.sep not in parts[1] \
        and not path.endswith((".json", ".yaml"))


def model_yaml(name_or_path: str) -> Path:
    """The YAML file for a shipped model name or a path to a user's own YAML."""
    name_or_path = str(name_or_path)
    where = shown(name_or_path)
    if is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        try:
            kind = "dir" if path.is_dir() else "file" if path.is_file() else "other" if path.exists() else None
        except OSError as e:  # a name too long, a loop of links, ...
            raise DiffstageError(f"model YAML {where} cannot be read: {e.strerror or e}") from None
        if kind == "dir":
            raise DiffstageError(f"model YAML {where} is a directory; give the .yaml file inside it")
        if kind is None:
            raise DiffstageError(f"model YAML {where} does not exist")
        if kind == "other":
            raise DiffstageError(f"model YAML {where} is not a regular file (a FIFO or device?)")
        return path.resolve()
    models = available_models()
    if name_or_path not in models:
        hint = did_you_mean(name_or_path, models)
        raise DiffstageError(f"unknown model {where}" + (f"; {hint}" if hint else "") +
                             f" (available: {', '.join(models) or 'none'}; or give a path to a .yaml file)")
    return models[name_or_path]

