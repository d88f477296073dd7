"""Base class for diffstage's own implementations of Diffusers models.

A native model keeps Diffusers' parameter names, so it loads a Diffusers-format folder
(config.json + safetensors) unchanged, and strictly: a missing, unexpected or misshapen
tensor is an error, never a silently random weight. It runs on diffstage's attention
layer and kernels, chosen at build time by `configure_runtime`."""
from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .attention import get_backend
from .attention.layer import DEFAULT_BACKEND
from .checkpoint_files import read_json_object, require_regular_file, shard_files
from .errors import LoadError, strict_bool
from .kernels import get_kernels
from .torch_utils import parse_dtype

log = logging.getLogger(__name__)


class ModelConfig(dict):
    """The model's constructor arguments, readable as keys or attributes (like Diffusers' config)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor in a .safetensors file, read one at a time with plain
    file reads: no memory map, so peak memory is the model plus one tensor, not plus the file.
    The header is checked before anything is allocated."""
    try:
        total = file.stat().st_size
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= total - 8:
                raise ValueError(f"header length {size} does not fit a {total}-byte file")
            header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            data_bytes = total - 8 - size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise ValueError(f"tensor '{name}' has dtype {info.get('dtype')!r}; supported: "
                                     f"{', '.join(_SAFETENSORS_DTYPES)}")
                shape, (begin, end) = info["shape"], info["data_offsets"]
                if not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise ValueError(f"tensor '{name}' has shape {shape}")
                nbytes = math.prod(shape) * dtype.itemsize
                if not (0 <= begin <= end <= data_bytes and end - begin == nbytes):
                    raise ValueError(f"tensor '{name}' has data offsets [{begin}, {end}] for {nbytes} bytes "
                                     f"(shape {shape}) in {data_bytes} bytes of data")
                tensor = torch.empty(shape, dtype=dtype)
                f.seek(8 + size + begin)
                if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != nbytes:
                    raise ValueError(f"file ends inside tensor '{name}'")
                yield name, tensor
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise LoadError(f"cannot read {file}: {type(e).__name__}: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those the shard index names, else the one unsuffixed file, else all.
    Variant files (name.fp16.safetensors) beside the main one are not read."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return shard_files(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        require_regular_file(file)
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise LoadError(f"'{folder}' has no .safetensors file (found: {found}); native models load safetensors only")
    main = [f for f in files if f.name.count(".") == 1]
    return main if len(main) == 1 else files


def read_state(folder: Path, dtype_of) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files, cast by `dtype_of(name)`; a name in two files is an error."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in safetensors_files(folder):
        for name, tensor in iter_safetensors(file):
            if name in state:
                raise LoadError(f"tensor '{name}' is in both {origin[name]} and {file}")
            state[name] = tensor.to(dtype_of(name)) if tensor.is_floating_point() else tensor
            origin[name] = file
    return state


class Linear(torch.nn.Linear):
    """nn.Linear that may keep its weights in a narrower dtype than the activations
    (runtime.matmul_dtype): inputs are cast to the weights' dtype for the matmul and the
    result back, so norms, residuals and attention keep the activations' precision.
    With equal dtypes both casts are no-ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


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
        """The activations' dtype (Linear weights may be narrower, see matmul_dtype)."""
        linear = {id(p) for m in self.modules() if isinstance(m, Linear) for p in m.parameters()}
        return next((p for p in self.parameters() if id(p) not in linear), next(self.parameters())).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_pretrained(cls, root: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype = torch.float32,
                        use_safetensors: bool | None = True, matmul_dtype: str | torch.dtype | None = None,
                        **_: Any) -> "NativeModel":
        """Build from a Diffusers-format folder. Each tensor is cast to its final dtype as it is
        read: `torch_dtype`, or `matmul_dtype` for Linear weights when given."""
        folder = Path(root) / (subfolder or "")
        config_file = folder / "config.json"
        config = read_json_object(config_file)
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise LoadError(f"{config_file}: {cls.__name__} does not take {', '.join(unknown)}; "
                            f"it takes {', '.join(sorted(accepted))}")
        with torch.device("meta"):  # no memory or time spent on weights about to be replaced
            model = cls(**kwargs)
        narrow = parse_dtype(matmul_dtype) if matmul_dtype is not None else torch_dtype
        linear = {f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, Linear)
                  for name, _ in module.named_parameters(recurse=False)}
        state = read_state(folder, lambda name: narrow if name in linear else torch_dtype)
        model.load_strict(state, source=str(folder))
        return model

    @classmethod
    def linear_parameters(cls, folder: str | Path) -> int:
        """How many weights the model's Linear layers hold, from its config alone (built on the meta device)."""
        config = read_json_object(Path(folder) / "config.json")
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        with torch.device("meta"):
            model = cls(**{k: v for k, v in config.items() if k in accepted})
        return sum(p.numel() for m in model.modules() if isinstance(m, Linear) for p in m.parameters())

    @classmethod
    def resolve_runtime(cls, folder: str | Path, execution: dict[str, Any], dtype: torch.dtype,
                        device: torch.device) -> dict[str, Any]:
        """`execution` with `auto` matmul_dtype and compile decided for this model and machine (see
        diffstage.hardware), logged in one line; `planned_images` (how many images the run will make, None:
        unknown) informs the compile choice and is dropped."""
        from .hardware import auto_compile, auto_matmul_dtype

        resolved = {k: v for k, v in execution.items() if k != "planned_images"}
        if resolved.get("matmul_dtype") != "auto" and resolved.get("compile") != "auto":
            return resolved
        params = cls.linear_parameters(folder)
        reasons = []
        if resolved.get("matmul_dtype") == "auto":
            choice, why = auto_matmul_dtype(dtype, device, params)
            resolved["matmul_dtype"] = str(choice)[6:] if choice is not None else None
            reasons.append(f"matmul_dtype={resolved['matmul_dtype'] or str(dtype)[6:]} ({why})")
        if resolved.get("compile") == "auto":
            resolved["compile"], why = auto_compile(execution.get("planned_images", 1), params)
            reasons.append(f"compile={str(resolved['compile']).lower()} ({why})")
        log.info("%s: runtime auto chose %s", cls.__name__, "; ".join(reasons))
        return resolved

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

    def configure_runtime(self, *, attention: str | None = None, kernels: str = "auto", compile: bool = False,
                          matmul_dtype: str | torch.dtype | None = None) -> None:
        """Pick the attention backend and kernels; `matmul_dtype` stores the Linear weights (and
        runs their matmuls) in that dtype; `compile` compiles each repeated block on its own."""
        backend = attention or DEFAULT_BACKEND
        get_backend(backend)  # unknown or not installed: a clear error now, not mid-run
        self.attention_backend = backend
        self.ops = get_kernels(kernels, self.device)
        if matmul_dtype is not None:
            dtype = parse_dtype(matmul_dtype)
            for module in self.modules():
                if isinstance(module, Linear):
                    module.to(dtype)
        if strict_bool(compile, "runtime.compile"):
            for name in self.repeated_blocks:
                for block in getattr(self, name):
                    block.compile(dynamic=True)
        log.info("%s: attention=%s kernels=%s compile=%s matmul_dtype=%s", type(self).__name__, backend,
                 self.ops.name, compile, matmul_dtype)
