"""Base class for diffstage's own implementations of Diffusers models.

A native model keeps Diffusers' parameter names, so it loads a Diffusers-format folder
(config.json + safetensors) unchanged, and strictly: a missing, unexpected or misshapen
tensor is an error, never a silently random weight. It runs on diffstage's attention
layer and kernels, chosen at build time by `configure_runtime`."""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .attention import get_backend
from .attention.layer import DEFAULT_BACKEND
from .errors import LoadError
from .kernels import get_kernels

log = logging.getLogger(__name__)


class ModelConfig(dict):
    """The model's constructor arguments, readable as keys or attributes (like Diffusers' config)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files (one file, or shards)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise LoadError(f"'{folder}' has no .safetensors file (found: {found}); native models load safetensors only")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


class NativeModel(torch.nn.Module):
    """Subclasses set `self.config` in __init__ and name their repeated blocks (ModuleLists)
    in `repeated_blocks`, which regional compilation compiles one block at a time."""

    repeated_blocks: tuple[str, ...] = ()
    config: ModelConfig

    def __init__(self) -> None:
        super().__init__()
        self.attention_backend = DEFAULT_BACKEND
        self.ops = get_kernels("reference")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_pretrained(cls, root: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype = torch.float32,
                        use_safetensors: bool | None = True, **_: Any) -> "NativeModel":
        folder = Path(root) / (subfolder or "")
        config_file = folder / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LoadError(f"cannot read {config_file}: {e}") from None
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise LoadError(f"{config_file}: {cls.__name__} does not take {', '.join(unknown)}; "
                            f"it takes {', '.join(sorted(accepted))}")
        with torch.device("meta"):  # no memory or time spent on weights about to be replaced
            model = cls(**kwargs)
        model.load_strict(read_safetensors(folder), source=str(folder))
        return model.to(torch_dtype)

    def load_strict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load every parameter from `state`, refusing missing, unexpected or misshapen tensors."""
        own = self.state_dict(keep_vars=True)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        misshapen = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                     for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
        problems = [f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                    for what, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
                    if items]
        if problems:
            raise LoadError(f"{source}: weights do not fit {type(self).__name__}: " + "; ".join(problems))
        self.load_state_dict(state, strict=True, assign=True)

    def configure_runtime(self, *, attention: str | None = None, kernels: str = "auto",
                          compile: bool = False) -> None:
        """Pick the attention backend and kernels; with `compile`, compile each repeated block."""
        backend = attention or DEFAULT_BACKEND
        get_backend(backend)  # unknown or not installed: a clear error now, not mid-run
        self.attention_backend = backend
        self.ops = get_kernels(kernels, self.device)
        if compile:
            for name in self.repeated_blocks:
                for block in getattr(self, name):
                    block.compile(dynamic=True)
        log.info("%s: attention=%s kernels=%s compile=%s", type(self).__name__, backend, self.ops.name, compile)
