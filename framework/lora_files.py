"""LoRA adapter files: read one, turn its keys into layers of the model, and check every layer against the
model before anything is applied (lora.py applies them).

Key formats (matched against the model's real module names, never a family's):
  Diffusers / peft  `<module>.<path>.lora_A.weight`, `.lora_B.weight` (and `.lora_B.bias`), `<module>.<path>.alpha`,
                    where <module> is a module of the model YAML (transformer, unet, text_encoder, ...); also with
                    peft's `base_model.model.` prefix, an adapter name (`lora_A.default.weight`), the older
                    `.lora.down/.lora.up` and `.lora_down/.lora_up` names, or no module prefix (the path must then
                    be a layer of exactly one module).
  Kohya             `lora_unet_<path with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha` for the
                    denoiser (any module that is not a text encoder), `lora_te_`/`lora_te1_` for text_encoder,
                    `lora_te2_`/`lora_te3_` for text_encoder_2/_3: each module path has its dots replaced by
                    underscores and is looked up.
Scaling, as Diffusers and peft: scale * alpha / r, alpha from a `.alpha` tensor, else Diffusers'
`lora_adapter_metadata` (lora_alpha, alpha_pattern), else r. Safetensors only, unless allow_pickle."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import LoraError, did_you_mean, shown
from .weight_files import ADVICE, PICKLE_SUFFIXES, require_safe_torch_load, safetensors_header_problem

PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"),
                  ("lora_te_", "text_encoder"), ("lora_unet_", None))  # None: the modules that are no text encoder
_SUFFIX = re.compile(r"^(?P<target>.+?)\.(?:lora_(?P<ab>[AB])(?:\.[\w-]+)?\.(?P<param>weight|bias)"
                     r"|lora[._](?P<du>down|up)\.weight|(?P<alpha>alpha))$")
ENTRY_KEYS = ("path", "scale")


@dataclass
class LoraLayer:
    """One adapted Linear: x -> up(down(x)) * scaling, added to its output."""

    module: str  # the model YAML's module name
    path: str  # the Linear's dotted path inside it
    key: str  # the file's first key for this layer (messages name it)
    down: torch.Tensor | None = None  # lora_A: [r, in_features]
    up: torch.Tensor | None = None  # lora_B: [out_features, r]
    up_bias: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        """alpha / r (alpha defaults to r), the factor a scale of 1 applies."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass(frozen=True)
class LoraFile:
    path: str
    identity: tuple  # resolved path, size, mtime, ctime, inode: a rewritten file is another file
    layers: tuple[LoraLayer, ...] = field(default_factory=tuple)


def file_identity(path: str | os.PathLike) -> tuple:
    try:
        resolved = Path(path).expanduser().resolve()
        st = resolved.stat()
    except OSError as e:
        raise LoraError(f"LoRA file {path}: cannot read it ({e.strerror or e})") from None
    if not resolved.is_file():
        raise LoraError(f"LoRA file {path}: not a file")
    return (str(resolved), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def read_lora_tensors(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a LoRA file and its safetensors metadata (pickle files only with allow_pickle)."""
    file = Path(path)
    if file.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraError(f"LoRA file {path}: a pickle file ({file.suffix}), and loading pickle can run arbitrary "
                            f"code; {ADVICE}")
        require_safe_torch_load()
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is about the file
            raise LoraError(f"LoRA file {path}: cannot read it: {type(e).__name__}: {e}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LoraError(f"LoRA file {path}: holds no mapping of names to tensors")
        return dict(state), {}
    why = safetensors_header_problem(file)
    if why:
        raise LoraError(f"LoRA file {path}: not a safetensors file ({why})")
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - a damaged file
        raise LoraError(f"LoRA file {path}: cannot read it: {type(e).__name__}: {e}") from None


def _linear_index(module: torch.nn.Module) -> dict[str, str]:
    """Every submodule path of `module`, and each with '.' as '_' (Kohya's spelling), -> the path."""
    paths = [name for name, _ in module.named_modules() if name]
    return {**{p.replace(".", "_"): p for p in paths}, **{p: p for p in paths}}


class _Locator:
    """Where a key's target is in the model: (module name, dotted path), or why not."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self._index: dict[str, dict[str, str]] = {}

    def index(self, name: str) -> dict[str, str]:
        if name not in self._index:
            self._index[name] = _linear_index(self.modules[name])
        return self._index[name]

    def locate(self, target: str) -> tuple[str, str]:
        target = target.removeprefix(PEFT_PREFIX)
        for prefix, module in KOHYA_PREFIXES:
            if target.startswith(prefix):
                names = [module] if module else [n for n in self.modules if not n.startswith("text_encoder")]
                return self._find(target[len(prefix):], names, f"module '{module}'" if module else "the denoiser")
        head, _, rest = target.partition(".")
        if rest and head in self.modules:
            return self._find(rest, [head], f"module '{head}'")
        if rest and re.fullmatch(r"(unet|transformer|prior|text_encoder(_\d)?)", head):
            raise ValueError(f"it is for module '{head}', which this model does not have (its modules: "
                             f"{', '.join(self.modules)})")
        return self._find(target, list(self.modules), "any module of the model")

    def _find(self, path: str, names: list[str], where: str) -> tuple[str, str]:
        if not any(n in self.modules for n in names):
            raise ValueError(f"it is for {where}, which this model does not have (its modules: "
                             f"{', '.join(self.modules)})")
        found = [(n, self.index(n)[path]) for n in names if n in self.modules and path in self.index(n)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"'{path}' is a layer of several modules ({', '.join(n for n, _ in found)}); prefix the "
                             "key with the module's name")
        known = [p for n in names if n in self.modules for p in self.index(n)]
        hint = did_you_mean(path, known) if len(known) < 20000 else None
        raise ValueError(f"{where} has no layer '{path}'" + (f" ({hint})" if hint else ""))


def _gather(tensors: dict[str, torch.Tensor], locator: _Locator) -> dict[tuple[str, str], LoraLayer]:
    """The file's keys grouped into layers (ValueError naming the first key that fits no layer)."""
    layers: dict[tuple[str, str], LoraLayer] = {}
    for key in sorted(tensors):
        match = _SUFFIX.match(key)
        if match is None:
            what = "a DoRA magnitude (DoRA is not supported)" if "lora_magnitude" in key else \
                "not a LoRA weight (lora_A/lora_B, lora_down/lora_up or alpha)"
            raise ValueError(f"key '{key}': {what}")
        try:
            where = locator.locate(match["target"])
        except ValueError as e:
            raise ValueError(f"key '{key}': {e}") from None
        layer = layers.setdefault(where, LoraLayer(*where, key=key))
        value = tensors[key]
        if match["alpha"]:
            if value.numel() != 1:
                raise ValueError(f"key '{key}': alpha must be one number, got shape {list(value.shape)}")
            layer.alpha = float(value.reshape(()).item())
        elif match["ab"] == "A" and match["param"] == "bias":
            raise ValueError(f"key '{key}': a lora_A bias is not supported")
        elif match["param"] == "bias":
            layer.up_bias = value
        else:
            setattr(layer, "down" if match["ab"] == "A" or match["du"] == "down" else "up", value)
    return layers


def _layer_problem(layer: LoraLayer, target: torch.nn.Module) -> str | None:
    """What makes `layer` unfit for `target`, or None."""
    if not isinstance(target, torch.nn.Linear):
        return f"'{layer.path}' of module '{layer.module}' is a {type(target).__name__}, not a Linear (LoRA " \
               "applies to Linear layers only)"
    if layer.down is None or layer.up is None:
        return f"'{layer.path}' has lora_{'A/down' if layer.up is None else 'B/up'} but no " \
               f"lora_{'B/up' if layer.up is None else 'A/down'} weight"
    down, up = layer.down, layer.up
    if down.ndim != 2 or down.shape[1] != target.in_features or up.ndim != 2 \
            or up.shape != (target.out_features, down.shape[0]):
        return f"shapes do not fit '{layer.path}' of module '{layer.module}' ({target.in_features} -> " \
               f"{target.out_features}): lora_A {list(down.shape)} must be [r, {target.in_features}], lora_B " \
               f"{list(up.shape)} must be [{target.out_features}, r]"
    if layer.up_bias is not None and layer.up_bias.shape != (target.out_features,):
        return f"lora_B bias {list(layer.up_bias.shape)} must be [{target.out_features}]"
    if not (down.is_floating_point() and up.is_floating_point()):
        return f"weights must be floating point, got {down.dtype if not down.is_floating_point() else up.dtype}"
    if down.shape[0] == 0:
        return f"rank 0 (lora_A {list(down.shape)}): an adapter of rank 0 adds nothing; leave the layer out"
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        return "weights that are not finite (NaN or infinity)"
    return None


def _adapter_metadata(metadata: dict) -> dict:
    """Diffusers' `lora_adapter_metadata` (each module's LoraConfig, keys prefixed with the module's name)."""
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _metadata_alpha(metadata: dict, module: str, path: str) -> float | None:
    """The alpha Diffusers' `lora_adapter_metadata` gives a layer (alpha_pattern, then lora_alpha)."""
    meta = _adapter_metadata(metadata)
    pattern = meta.get(f"{module}.alpha_pattern", meta.get("alpha_pattern")) or {}
    for name, alpha in pattern.items() if isinstance(pattern, dict) else ():
        if path == name or path.endswith("." + name):
            return float(alpha)
    alpha = meta.get(f"{module}.lora_alpha", meta.get("lora_alpha"))
    return float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None


def load_lora_file(path: str | os.PathLike, modules: dict[str, torch.nn.Module], allow_pickle: bool = False) -> LoraFile:
    """Read and check a LoRA file against `modules` (the model's, by YAML name): LoraError names the file and
    the first key that does not fit. Nothing is applied here."""
    identity = file_identity(path)
    tensors, metadata = read_lora_tensors(identity[0], allow_pickle)  # the file whose identity was taken (~ expanded)
    if not tensors:
        raise LoraError(f"LoRA file {path}: holds no tensors")
    if any(k.endswith("use_dora") and v for k, v in _adapter_metadata(metadata).items()):
        raise LoraError(f"LoRA file {path}: a DoRA adapter (use_dora), which is not supported")
    try:
        layers = _gather(tensors, _Locator(modules))
        for layer in layers.values():
            target = modules[layer.module].get_submodule(layer.path)
            why = _layer_problem(layer, target)
            if why:
                raise ValueError(f"key '{layer.key}': {why}")
            if layer.alpha is None:
                layer.alpha = _metadata_alpha(metadata, layer.module, layer.path)
            if layer.alpha is not None and not math.isfinite(layer.alpha):
                raise ValueError(f"key '{layer.key}': alpha is {layer.alpha}, not a finite number")
    except ValueError as e:
        raise LoraError(f"LoRA file {path}: {e}") from None
    return LoraFile(str(path), identity, tuple(layers.values()))


def lora_list_problems(value: Any, key: str = "lora") -> list[str]:
    """What is wrong with a list of adapters ([{path: FILE, scale: NUMBER}], scale defaulting to 1)."""
    if value is None:
        return []
    example = "[{path: style.safetensors, scale: 0.8}]"
    if not isinstance(value, (list, tuple)):
        return [f"{key} must be a list of adapters such as {example}, got {shown(value)}"]
    problems = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be a mapping {{path: FILE, scale: NUMBER}}, got {shown(entry)}")
            continue
        for name in entry:
            if name not in ENTRY_KEYS:
                hint = did_you_mean(name, ENTRY_KEYS)
                problems.append(f"{where}: unknown key '{name}'" + (f" ({hint})" if hint else "; known: path, scale"))
        path = entry.get("path")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            problems.append(f"{where}.path must be the path of a LoRA file (a string), got {shown(path)}")
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            problems.append(f"{where}.scale must be a number, got {shown(scale)}")
    return problems
