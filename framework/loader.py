"""Load the modules a model spec lists from a Diffusers-format checkpoint.

A checkpoint is a directory with model_index.json and one subfolder per module,
or a Hugging Face repo id (fetched with snapshot_download, which honours
HF_HUB_OFFLINE and the local cache). Weights load from safetensors only unless
the user allows pickle. Loaded modules are cached in the session (session.py), keyed by
their files' identity, so building the same model twice loads nothing the second time."""
from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint_files import check_module_folder, read_json_object
from .errors import DiffstageError, DisallowedPathError, LoadError, shown, strict_bool
from .models_dir import looks_like_repo_id
from .module_cache import ModuleCache, folder_identity
from .pretrained import from_pretrained, module_kind
from .quantize import check_quantizable, quantize_module
from .resolve import DEFAULT_ALLOWLIST, resolve
from .session import default_session
from .spec import ModelSpec
from .torch_utils import parse_dtype
from .weight_files import check_pickle_free, check_safetensors_headers, named_weight_files, require_safe_torch_load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleKey:
    """What a loaded module is: the same key means the same weights (see module_cache.py)."""

    path: str
    subfolder: str
    cls: str
    dtype: str
    device: str
    execution: str = "-"  # native modules: their attention/kernels/compile settings
    files: str = ""  # the identity and modification of the module folder's files (folder_identity)
    quantize: str = "none"  # runtime.quantize applied to it: a quantized module is never an unquantized one


def clear_cache() -> None:
    """Forget the default session's loaded modules."""
    default_session().modules.clear()


ANY_PIPELINE = "*"  # a model YAML's pipeline_name that serves any checkpoint (all its modules are loaded)


def index_modules(index: dict) -> list[str]:
    """The module names model_index.json lists with a class (optional components may be [null, null])."""
    return [name for name, entry in index.items() if not name.startswith("_") and isinstance(entry, list)
            and len(entry) == 2 and all(isinstance(x, str) for x in entry)]


def pipeline_class(model_path: str | os.PathLike, allowlist: Iterable[str] = DEFAULT_ALLOWLIST) -> type:
    """The Diffusers pipeline class a checkpoint's model_index.json names, through the allowlist. Only a
    DiffusionPipeline subclass: the fallback calls the class with every loaded module, and any other name
    (a function, a model class that builds a default 12B-parameter model) would run as it likes."""
    index = read_json_object(resolve_checkpoint(model_path, ()) / "model_index.json")
    name = index.get("_class_name")
    if not isinstance(name, str) or not name.isidentifier():
        raise LoadError(f"model_index.json of '{model_path}' names no pipeline class (_class_name: {shown(name)})")
    try:
        cls = resolve(f"diffusers.{name}", allowlist)
    except DiffstageError as e:
        raise LoadError(f"the checkpoint's pipeline class 'diffusers.{name}' cannot be loaded: {e}") from None
    from diffusers import DiffusionPipeline

    callable_pipeline = isinstance(cls, type) and issubclass(cls, DiffusionPipeline) and any(
        "__call__" in vars(c) for c in cls.__mro__ if c is not object)  # not the abstract base itself
    if not callable_pipeline:
        raise LoadError(f"model_index.json of '{model_path}' names _class_name '{name}', which is not a Diffusers "
                        "pipeline (a subclass of diffusers.DiffusionPipeline); refused")
    return cls


def resolve_checkpoint(model_path: str | os.PathLike, subfolders: Iterable[str]) -> Path:
    """A local checkpoint directory for `model_path` (downloading a repo id if allowed)."""
    p = Path(model_path).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise LoadError(f"'{p}' is not a Diffusers-format checkpoint: it has no model_index.json")
        return p.resolve()
    text = str(model_path)
    if not looks_like_repo_id(text):
        raise LoadError(f"model path '{text}' does not exist (expected a checkpoint directory or a "
                        "Hugging Face repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json"] + [f"{s}/*" for s in subfolders]
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network, auth, offline-without-cache: all the user's to fix
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(e).splitlines()[0]
        raise LoadError(f"'{text}' is not a local directory, and getting it as a Hugging Face repo id failed: "
                        f"{why}") from None


def check_safetensors(folder: Path, module: str, allow_pickle: bool, files: list[Path]) -> None:
    """Without allow_pickle, refuse a module whose weights the loaders would unpickle (see weight_files);
    with it, refuse a torch whose pickle guard has a known bypass. `files`: the folder's files."""
    if allow_pickle:
        require_safe_torch_load()
        return
    named = named_weight_files(folder)  # the indexes and configs read once, for both checks
    check_pickle_free(module, files, named)
    check_safetensors_headers(folder, module, named)


def module_class(spec: ModelSpec, name: str, index: dict, allowlist: Iterable[str]) -> type:
    target = spec.module_spec(name).target
    if target is not None:
        return resolve(target, allowlist)  # checked statically already
    entry = index.get(name)
    if entry == [None, None]:  # an optional component this checkpoint was saved without
        raise LoadError(f"module '{name}': this checkpoint has none (model_index.json lists it as [null, null]), "
                        f"but model '{spec.name}' uses it; use a YAML without it for this checkpoint")
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) and e for e in entry)):
        raise LoadError(f"module '{name}' is not in model_index.json; give its class with `_target_` in "
                        f"the YAML's modules.{name}")
    target = f"{entry[0]}.{entry[1]}"
    try:
        cls = resolve(target, allowlist)
    except DisallowedPathError:
        raise DisallowedPathError(
            f"the checkpoint's model_index.json names '{target}' for module '{name}', which is outside the import "
            f"allowlist {list(allowlist)}; refused. Checkpoints cannot choose code to run: if you trust this "
            f"one, set modules.{name}._target_ in the model YAML (and extend the allowlist)") from None
    except DiffstageError as e:
        raise LoadError(f"module '{name}': model_index.json names class '{target}', which cannot be loaded: {e}") from None
    try:
        module_kind(cls)
    except LoadError as e:
        raise LoadError(f"module '{name}': model_index.json names '{target}': {e}") from None
    return cls


def _runtime_for(name: str, cls: type, folder: Path, execution: dict[str, Any], dtype: torch.dtype,
                 device) -> dict[str, Any]:
    """The module's runtime options with `auto` choices made (native models decide them from their config)."""
    try:
        if hasattr(cls, "resolve_runtime") and folder.is_dir():
            return cls.resolve_runtime(folder, execution, dtype, torch.device(device))
    except DiffstageError:
        raise
    except Exception as e:  # the config does not build the model: the load would say the same
        raise LoadError(f"module '{name}': {cls.__name__} cannot be built from '{folder / 'config.json'}': "
                        f"{type(e).__name__}: {e}") from None
    options = {k: v for k, v in execution.items() if k != "planned_images"}
    if options.get("matmul_dtype") == "auto":
        options["matmul_dtype"] = None
    if options.get("compile") == "auto":
        options["compile"] = False
    return options


def checkpoint_folders(spec: ModelSpec, model_path: str | os.PathLike) -> tuple[Path, dict, dict[str, str]]:
    """(the checkpoint's directory, its model_index.json, module name -> subfolder for each module to load),
    once the checkpoint is known to be one the spec serves."""
    subfolders = {n: spec.module_spec(n).subfolder or n for n in spec.modules}
    root = resolve_checkpoint(model_path, subfolders.values())
    index = read_json_object(root / "model_index.json")
    if spec.pipeline_name == ANY_PIPELINE:  # every module the checkpoint lists (the Diffusers fallback)
        subfolders = {n: n for n in index_modules(index)}
        root = resolve_checkpoint(model_path, subfolders.values())  # a repo id: fetch those folders too
    if spec.pipeline_name not in (ANY_PIPELINE, index.get("_class_name")):
        raise LoadError(f"checkpoint '{root}' is a {shown(index.get('_class_name'))}, but model '{spec.name}' "
                        f"serves {spec.pipeline_name}; pick the model YAML that matches this checkpoint (or "
                        "model=diffusers_auto to run it with its own Diffusers pipeline)")
    return root, index, subfolders


def load_modules(spec: ModelSpec, model_path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", allow_pickle: bool = False,
                 allowlist: Iterable[str] = DEFAULT_ALLOWLIST,
                 execution: dict[str, Any] | None = None, keys: dict[str, str] | None = None,
                 cache: ModuleCache | None = None, quantize: dict[str, str] | None = None,
                 offload: Any = None) -> dict[str, Any]:
    """Load (or fetch from `cache`, by default the default session's) every module the spec lists. Modules
    with a `configure_runtime` method (native models) are configured with `execution`. `keys`, when given,
    receives each module's key (where it came from and which files: the same key means the same weights).
    `offload` (runtime.offload, an offload.OffloadedModules): it makes the torch modules, and loads them when."""
    cache = cache if cache is not None else default_session().modules
    quantize = quantize or {}  # module name -> runtime.quantize method (quantize.quantize_targets)
    allow_pickle = strict_bool(allow_pickle, "allow_pickle")
    allowlist = tuple(allowlist)
    root, index, subfolders = checkpoint_folders(spec, model_path)
    classes = {name: module_class(spec, name, index, allowlist) for name in subfolders}  # all, before any loads
    for name in quantize or {}:  # a module without weights is refused before any loads too
        if name in classes:
            check_quantizable(name, classes[name])
    modules: dict[str, Any] = {}
    for name, sub in subfolders.items():
        cls = classes[name]
        mdtype = parse_dtype(spec.module_spec(name).dtype or dtype)
        is_torch = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
        folder = root / sub
        if not folder.is_dir():
            raise LoadError(f"module '{name}': folder '{folder}' does not exist in the checkpoint")
        files = check_module_folder(folder, root)  # every build, cached or not (files change), before
        # anything reads them (a native model's runtime options read its config)
        check_safetensors(folder, name, allow_pickle, files)
        configurable = execution is not None and hasattr(cls, "configure_runtime")
        options = _runtime_for(name, cls, folder, execution, mdtype, device) if configurable else None
        if options is not None and name in quantize:  # its Linear weights become int8/fp8, not matmul_dtype
            options["matmul_dtype"] = None
        key = ModuleKey(str(root), sub, f"{cls.__module__}.{cls.__qualname__}",
                        str(mdtype) if is_torch else "-", str(device) if is_torch else "-",
                        repr(sorted(options.items())) if configurable else "-", folder_identity(folder, files),
                        quantize.get(name, "none"))
        if keys is not None:
            keys[name] = repr(key)
        load = functools.partial(_load_module, name, cls, root, sub, mdtype, allow_pickle, options, quantize.get(name))
        if offload is not None and is_torch:  # its weights come and go with one pipeline's stages: not cached
            modules[name] = offload.add(name, cls, folder, mdtype, load, options)
            continue
        cached = cache.get(key)
        if cached is not None:
            # Weights are shared; stateful helpers (schedulers keep their timesteps) are not.
            modules[name] = cached if is_torch else copy.deepcopy(cached)
            continue
        module = load(device, configure=configurable)
        cache.put(key, module)
        modules[name] = module
    return modules


def _load_module(name: str, cls: type, root: Path, sub: str, mdtype: torch.dtype, allow_pickle: bool,
                 options: dict[str, Any] | None, quantize: str | None, device: str | torch.device,
                 configure: bool) -> Any:
    """One module from the checkpoint's `sub` folder, on `device` (torch modules), quantized and configured
    (`configure`: with the run's execution `options`) as `load_modules` says."""
    folder = root / sub
    try:
        module = from_pretrained(cls, root, sub, mdtype, allow_pickle, options)
    except DiffstageError:
        raise
    except Exception as e:  # corrupt weights, config/weight mismatch, wrong class: all about the files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LoadError(f"module '{name}': loading {cls.__name__} from '{folder}' failed: "
                        f"{type(e).__name__}: {first}") from None
    if isinstance(module, torch.nn.Module):
        module = module.to(device).eval().requires_grad_(False)
    if quantize is not None:  # before configure_runtime compiles its blocks
        quantize_module(module, quantize, name)
    if configure:
        module.configure_runtime(**options)
    log.info("loaded %s (%s) from %s", name, cls.__name__, folder)
    return module
