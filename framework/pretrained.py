"""Calling a library class's from_pretrained: which classes may load a module at all (module_kind), and
loading one so that weights that do not match its config are an error rather than a log line."""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import DiffstageError, LoadError
from .resolve import resolve


@functools.lru_cache(maxsize=1)
def _weightless_bases() -> tuple[type, ...]:
    """Classes of modules that load from configs/vocabularies only (no tensors)."""
    bases = []
    for path in ("diffusers.SchedulerMixin", "transformers.PreTrainedTokenizerBase", "transformers.ProcessorMixin",
                 "transformers.ImageProcessingMixin", "transformers.FeatureExtractionMixin"):
        try:
            bases.append(resolve(path))
        except DiffstageError:
            pass  # an older/newer library without it
    return tuple(bases)


def module_kind(cls: Any) -> str:
    """'weights' (a torch module) or 'config' (scheduler, tokenizer, processor). Anything else is
    refused: a whole pipeline or an Auto* class would load what it likes, bypassing our checks."""
    if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
        if issubclass(cls, torch.nn.Module):
            return "weights"
        if issubclass(cls, _weightless_bases()):
            return "config"
    name = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
    raise LoadError(f"'{name}' cannot load a module: expected a torch model class, a scheduler, a tokenizer or "
                    "a processor with from_pretrained")


def _reports_loading_info(cls: type) -> bool:
    """Diffusers' and Transformers' models can say which weights they did not find (others load strictly
    themselves, like diffstage's native models, or are the author's responsibility)."""
    bases = []
    for path in ("diffusers.ModelMixin", "transformers.PreTrainedModel"):
        try:
            bases.append(resolve(path))
        except DiffstageError:
            pass
    return issubclass(cls, tuple(bases))


def _check_loading_info(name: str, folder: Path, info: dict) -> None:
    """Missing weights would be left randomly initialised and unexpected ones ignored: both mean the
    checkpoint does not match its config, which Diffusers and Transformers only log."""
    problems = []
    for key, what in (("missing_keys", "missing (they would be random)"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):
        keys = sorted(str(k) for k in (info.get(key) or ()))
        if keys:
            shown_keys = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{what}: {shown_keys}")
    problems += [str(m) for m in info.get("error_msgs") or ()]
    if problems:
        raise LoadError(f"module '{name}': the weights in '{folder}' do not match its config.json; "
                        + "; ".join(problems))


_ADAPTER_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_checkpoint_adapters() -> Iterator[None]:
    """Transformers' from_pretrained, where peft is installed, applies an adapter_config.json it finds in the folder
    and may load the base model that config names instead (from the Hub): a checkpoint would choose what loads.
    Its discovery is turned off while diffstage loads a module (LoRA adapters are diffstage's own: lora.py)."""
    try:
        import transformers.integrations.peft as transformers_peft
    except ImportError:  # an older or newer Transformers without it
        yield
        return
    with _ADAPTER_LOCK:
        found = transformers_peft.is_peft_available
        transformers_peft.is_peft_available = lambda: False
        try:
            yield
        finally:
            transformers_peft.is_peft_available = found


def from_pretrained(cls: type, root: Path, subfolder: str, dtype: torch.dtype, allow_pickle: bool,
                    execution: dict[str, Any] | None) -> Any:
    """cls.from_pretrained for the checkpoint's `subfolder`, in `dtype`, safetensors only unless allow_pickle."""
    if module_kind(cls) == "config":
        return cls.from_pretrained(root, subfolder=subfolder)  # tokenizers, schedulers: no weights
    kwargs: dict[str, Any] = {"subfolder": subfolder, "use_safetensors": None if allow_pickle else True}
    strict = _reports_loading_info(cls)
    if strict:
        kwargs["output_loading_info"] = True
    if execution and execution.get("matmul_dtype") and hasattr(cls, "configure_runtime"):
        kwargs["matmul_dtype"] = execution["matmul_dtype"]  # native: read the weights straight into it
    if cls.__module__.startswith("transformers."):
        import transformers

        major = int(transformers.__version__.split(".")[0])
        kwargs["dtype" if major >= 5 else "torch_dtype"] = dtype
    else:
        kwargs["torch_dtype"] = dtype
    with _no_checkpoint_adapters() if cls.__module__.startswith("transformers.") else contextlib.nullcontext():
        if not strict:
            return cls.from_pretrained(root, **kwargs)
        module, info = cls.from_pretrained(root, **kwargs)
    _check_loading_info(subfolder, root / subfolder, info)
    return module
