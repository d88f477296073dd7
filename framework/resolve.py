"""Resolve dotted paths ("package.module.attr") through an allowlist.

This is a security boundary: a model YAML from the internet must not be able to
import or call anything outside the allowed prefixes (os.system, builtins.eval,
subprocess.*). The check happens on the string, before anything is imported."""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from .errors import DisallowedPathError, DiffstageError

DEFAULT_ALLOWLIST: tuple[str, ...] = ("diffstage.", "diffusers.", "transformers.", "torch.")


def is_allowed(path: str, allowlist: Iterable[str] = DEFAULT_ALLOWLIST) -> bool:
    if not isinstance(path, str) or not path or path.startswith(".") or ".." in path:
        return False
    for prefix in allowlist:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        if path.startswith(prefix):
            return True
    return False


def check_allowed(path: str, allowlist: Iterable[str] = DEFAULT_ALLOWLIST) -> None:
    allowlist = tuple(allowlist)
    if not is_allowed(path, allowlist):
        raise DisallowedPathError(
            f"'{path}' is outside the import allowlist {list(allowlist)}; "
            "add its package prefix to `allowlist` in your config if you trust it"
        )


def resolve(path: str, allowlist: Iterable[str] = DEFAULT_ALLOWLIST) -> Any:
    """Import and return the object a dotted path names, if the allowlist permits it.

    Tries the longest importable module prefix, then walks attributes, so both
    'pkg.mod.func' and 'pkg.mod.Class.method' work."""
    check_allowed(path, allowlist)
    parts = path.split(".")
    last_error: Exception | None = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only swallow "this prefix is not a module"; a missing dependency
            # inside a real module is a genuine error worth showing.
            if e.name and not module_name.startswith(e.name) and e.name != module_name:
                raise DiffstageError(f"importing '{module_name}' for '{path}' failed: {e}") from e
            last_error = e
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise DiffstageError(f"cannot resolve '{path}': module '{module_name}' has no attribute "
                                 f"'{'.'.join(parts[split:])}'") from None
        return obj
    raise DiffstageError(f"cannot resolve '{path}': no importable module in it ({last_error})")
