"""Resolve dotted paths ("package.module.attr") through an allowlist.

This is a security boundary: a model YAML from the internet must not be able to
import or call anything outside the allowed prefixes (os.system, builtins.eval,
subprocess.*). The check happens on the string, before anything is imported."""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .errors import DisallowedPathError, DiffstageError, shown

DEFAULT_ALLOWLIST: tuple[str, ...] = ("diffstage.", "diffusers.", "transformers.", "torch.")
MAX_PATH = 300  # characters of a dotted path; longer ones are not real Python names


def is_dotted_path(path: object) -> bool:
    """Python identifiers joined by dots, at most MAX_PATH characters."""
    return isinstance(path, str) and 0 < len(path) <= MAX_PATH and all(p.isidentifier() for p in path.split("."))


# Objects a Python caller handed over directly (PipelineBuilder: a stage class or a callback function), by
# the name that stands for them in the model data. They need no import and no allowlist: the caller already
# holds them. Only set while a builder checks or builds; a YAML file never has any.
_GIVEN: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("diffstage_given_objects", default={})


@contextlib.contextmanager
def given_objects(objects: Mapping[str, Any]) -> Iterator[None]:
    """Within this block, `resolve(name)` returns `objects[name]` for the names in `objects`."""
    token = _GIVEN.set(dict(objects))
    try:
        yield
    finally:
        _GIVEN.reset(token)


def given_object(path: Any) -> Any:
    """The object a caller handed over under this name (see given_objects), or None."""
    return _GIVEN.get().get(path) if isinstance(path, str) else None


# Reached through an allowed prefix, these load pickles, fetch or run remote code, or write files: no dotted
# path may name them (nor anything inside them), whatever name it reaches them by (see `resolve`).
REFUSED = ("torch.hub", "torch.load", "torch.save", "torch.serialization", "torch.jit.load", "torch.jit.save",
           "torch.package", "torch.utils.model_zoo", "torch.utils.cpp_extension", "torch.distributed.rpc",
           "torch.distributed.checkpoint", "torch.export", "torch.onnx", "torch.multiprocessing",
           "torch.compiler.load_cache_artifacts", "torch.utils.collect_env", "torch.utils.benchmark",
           "diffusers.utils.hub_utils", "diffusers.utils.dynamic_modules_utils", "diffusers.utils.loading_utils",
           "diffusers.utils.export_utils", "diffusers.utils.testing_utils", "diffusers.utils.remote_utils",
           "diffusers.pipelines.stable_diffusion.convert_from_ckpt", "diffusers.loaders",
           "transformers.dynamic_module_utils", "transformers.utils.hub", "transformers.pipelines",
           "transformers.hf_argparser", "transformers.trainer", "transformers.testing_utils")
# ...and, in the libraries, the methods that load, save or download by themselves (a YAML names classes; the
# loader calls their from_pretrained, checked), and torch.ops/torch.classes.load_library (a native library)
REFUSED_NAMES = ("from_pretrained", "from_single_file", "from_config", "save_pretrained", "push_to_hub",
                 "load_state_dict", "save_config", "load_image", "load_video", "export_to_video", "export_to_gif",
                 "load_lora_weights", "load_ip_adapter", "load_textual_inversion", "download", "load_library")
# Packages that provide classes (modules, schedulers, stages' building blocks), not callbacks.
LIBRARIES = ("diffusers.", "transformers.", "torch.")
CALLBACK_HINT = ("callbacks come from diffstage. or your own allowlisted packages; to use a library function, "
                 "call it from a function of your own")


def refusal(path: str) -> str | None:
    """Why `path` (a dotted path, or the home.qualname it resolved to) is refused outright, or None."""
    if not isinstance(path, str):
        return None
    for bad in REFUSED:
        if path == bad or path.startswith(bad + "."):
            return (f"{shown(path)} is refused: {bad} loads pickles, fetches or runs remote code, or writes files, "
                    "which nothing in a model YAML may do")
    if _under(path, LIBRARIES) and path.rsplit(".", 1)[-1] in REFUSED_NAMES:
        return (f"{shown(path)} is refused: it loads, saves or downloads by itself, which nothing in a model "
                "YAML may do")
    return None


def callback_allowlist(allowlist: Iterable[str]) -> tuple[str, ...]:
    """The prefixes callbacks may come from: the allowlist without the libraries (diffusers., transformers.,
    torch.) and anything inside them (allowlist=[torch.utils] adds no callbacks): their functions are building
    blocks, not callbacks."""
    return tuple(p for p in allowlist if not _under(p if p.endswith(".") else p + ".", LIBRARIES))


def is_allowed(path: str, allowlist: Iterable[str] = DEFAULT_ALLOWLIST) -> bool:
    if given_object(path) is not None:
        return True
    if not is_dotted_path(path) or refusal(path):
        return False
    if any(part.startswith("_") for part in path.split(".")):
        return False  # private names and __main__ modules (importing one runs a program)
    return _under(path, allowlist)


def _under(name: str, allowlist: Iterable[str]) -> bool:
    for prefix in allowlist:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        if name.startswith(prefix):
            return True
    return False


ALLOWLIST_HINT = ("if you trust it, add its package prefix to the allowlist: allowlist=[prefix] on the "
                  "command line or in the run config, --allow prefix for `diffstage validate`")


def disallowed(path: str, allowlist: Iterable[str]) -> tuple[str, str | None]:
    """(why `path` is refused, a hint or None): not a dotted path at all, or outside the allowlist."""
    if not is_dotted_path(path):
        return f"{shown(path)} is not a dotted Python path (package.module.name, at most {MAX_PATH} characters)", None
    if refusal(path):
        return refusal(path), None
    return f"{shown(path)} is outside the import allowlist {list(allowlist)}; refused without importing it", \
        ALLOWLIST_HINT


def check_allowed(path: str, allowlist: Iterable[str] = DEFAULT_ALLOWLIST) -> None:
    allowlist = tuple(allowlist)
    if not is_allowed(path, allowlist):
        message, hint = disallowed(path, allowlist)
        raise DisallowedPathError(f"{message} ({hint})" if hint else message)


_UNKNOWN = "<unknown module>"  # never under an allowlist prefix


def _home(obj: Any) -> str | None:
    """The module an object was defined in (or is), for re-exports like 'torch.os.system'.

    Built-in bound methods (`sys.stdout.write` kept as a module attribute) have no `__module__`:
    their owner's module counts. A callable whose home cannot be told is refused."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    home = getattr(obj, "__module__", None)
    if isinstance(home, str):
        return home
    owner = getattr(obj, "__self__", None)
    if owner is None:
        owner = getattr(obj, "__objclass__", None)
    if owner is not None:
        if isinstance(owner, types.ModuleType):
            return owner.__name__
        owner_home = getattr(owner if isinstance(owner, type) else type(owner), "__module__", None)
        return owner_home if isinstance(owner_home, str) else _UNKNOWN
    return _UNKNOWN if callable(obj) else None


def resolve(path: str, allowlist: Iterable[str] = DEFAULT_ALLOWLIST) -> Any:
    """Import and return the object a dotted path names, if the allowlist permits it.

    Tries the longest importable module prefix, then walks attributes, so both
    'pkg.mod.func' and 'pkg.mod.Class.method' work. Only allowed modules are
    imported, and the object found must itself live in an allowed module, so
    'torch.os.system' (os reached through torch) is refused too."""
    given = given_object(path)
    if given is not None:
        return given
    allowlist = tuple(allowlist)
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
                raise DiffstageError(f"importing '{module_name}' for {shown(path)} failed: {e}") from None
            last_error = e
            continue
        except Exception as e:  # a broken module (syntax error, failing import-time code)
            raise DiffstageError(f"importing '{module_name}' for {shown(path)} failed: {type(e).__name__}: {e}") from None
        for i, attr in enumerate(parts[split:]):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise DiffstageError(f"cannot resolve {shown(path)}: module '{module_name}' has no attribute "
                                     f"'{'.'.join(parts[split:split + i + 1])}'") from None
            home = _home(obj)
            qualname = getattr(obj, "__qualname__", None)
            canonical = f"{home}.{qualname}" if home and isinstance(qualname, str) else home
            if canonical and refusal(canonical):  # an alias of a refused function ('torch.functional.load', ...)
                raise DisallowedPathError(f"{shown(path)} reaches '{canonical}': {refusal(canonical)}")
            if home is not None and not _under(home + ".", allowlist):
                where = home if isinstance(obj, types.ModuleType) else f"{home}.{getattr(obj, '__qualname__', attr)}"
                raise DisallowedPathError(f"{shown(path)} reaches '{where}', which is outside the import allowlist "
                                          f"{list(allowlist)}; refused ({ALLOWLIST_HINT})")
        return obj
    if getattr(last_error, "name", None) == parts[0]:  # not even its top package: not installed, or off the path
        raise DiffstageError(f"cannot resolve {shown(path)}: no module named '{parts[0]}' can be imported; a package "
                             "of your own must be installed (pip install -e DIR) or on PYTHONPATH, besides being in "
                             "the allowlist")
    raise DiffstageError(f"cannot resolve {shown(path)}: no importable module in it ({last_error})")
