"""The model YAML's `acceleration:` declarations checked against the checkpoint before any weight loads.

The class comes from model_index.json and its shape from config.json, so what can be known then is known
then: the Ulysses degree against the attention heads, and the declared blocks, module paths and arguments
against the model built on torch's meta device (structure, no memory, no weights). A class that cannot be
built that way is checked when it loads (block_cache.py, distributed/split_plan.py), and the error then
names the module and the declaration."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import loader
from .attention.route import install_attention_route
from .block_cache import install_block_cache
from .checkpoint_files import read_json_object
from .distributed.split_plan import install_sequence_plan
from .distributed.state import ParallelState
from .errors import DiffstageError, Problem
from .model_check import CheckedModel
from .yaml_lines import format_key

log = logging.getLogger(__name__)


def locator(checked: CheckedModel, name: str):
    """key path under acceleration.NAME -> "file:line: acceleration.NAME.KEY", as problems say."""
    def locate(key: tuple) -> str:
        path = ("acceleration", name, *key)
        return Problem("", format_key(path), *checked.lines.where(path)).location()
    return locate


def _skeleton(cls: type, config: dict) -> torch.nn.Module | None:
    """`cls` built from `config` on the meta device (None when it cannot be built that way)."""
    if not (hasattr(cls, "from_config") and isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return None
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure just defers the check to the load
        log.info("%s does not build on the meta device (%s: %s); its declaration is checked when it loads",
                 cls.__name__, type(e).__name__, e)
        return None


def _heads(config: dict, name: str, folder: Path, state: ParallelState, locate) -> None:
    heads = config.get("num_attention_heads")
    if state.ulysses > 1 and isinstance(heads, int) and not isinstance(heads, bool) and heads % state.ulysses:
        raise DiffstageError(f"{locate(())}: parallel.ulysses={state.ulysses} splits the attention heads, but "
                             f"module '{name}' has {heads} (num_attention_heads in {folder / 'config.json'}); use "
                             f"a Ulysses degree that divides {heads} (or parallel.ring)")


def check_before_load(checked: CheckedModel, model_path: str | Path, allowlist: Iterable[str],
                      state: ParallelState) -> None:
    """Each declaration against its module's class and config, before any weight loads; DiffstageError at the
    declaration's file:line for what does not fit."""
    spec = checked.spec
    if not spec.acceleration:
        return
    root, index, subfolders = loader.checkpoint_folders(spec, model_path)
    for name, declared in spec.acceleration.items():
        if name not in subfolders:
            continue  # not a module this checkpoint has: the load says so
        folder = root / subfolders[name]
        config_file = folder / "config.json"
        if not config_file.is_file():
            continue  # the load reports the missing folder or file
        config: dict[str, Any] = read_json_object(config_file)
        locate = locator(checked, name)
        _heads(config, name, folder, state, locate)
        skeleton = _skeleton(loader.module_class(spec, name, index, tuple(allowlist)), config)
        if skeleton is not None:
            if declared.blocks is not None or declared.residual is not None:
                install_block_cache(skeleton, declared, locate)
            install_sequence_plan(skeleton, declared.sequence, locate)
            install_attention_route(skeleton, declared.attention.local)
