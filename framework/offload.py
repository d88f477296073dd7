"""runtime.offload: modules that hold their weights only while a stage needs them.

    none    every module loads at build time and stays where runtime.device says (the default)
    model   CPU: a low-memory mode. Weight modules are built empty (on the meta device) and load from the
            checkpoint when the first stage that uses them runs; a module holding at least RELEASE_SHARE of
            the pipeline's weights is released again after the last stage of the run that uses it (the text
            encoders after encoding, the transformer after denoising), so that peak memory is the largest
            stage's modules, not all of them. A later run reads released weights again from the safetensors.
            CUDA: modules live on the CPU and move to the GPU for the stages that use them.
    layers  CUDA only: the denoiser's repeated blocks stream to the GPU a block at a time (offload_layers.py).

Stages keep references to the module objects, so a module keeps its identity: loading puts the loaded
tensors into it (parameters, buffers and tensor attributes, by name) and releasing puts meta tensors back.
An offloaded module is never shared through the session's module cache (the loader keeps it out): its
weights come and go with one pipeline's stages, and another pipeline sharing it could run while they are gone."""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import DiffstageError, LoadError, did_you_mean, shown
from .run_hooks import RunHook

log = logging.getLogger(__name__)

CHOICES = ("none", "model", "layers")
# A module released after its stages in CPU low-memory mode holds at least this share of the pipeline's weights;
# smaller ones (tokenizer-sized encoders, a small VAE) stay loaded: rereading them every run costs more time than
# their memory is worth.
RELEASE_SHARE = 0.005


def offload_problems(runtime: dict[str, Any]) -> list[str]:
    """runtime.offload checked without the model (run_config.run_config_problems)."""
    mode = runtime.get("offload", "none")
    if mode in CHOICES:
        return []
    hint = did_you_mean(mode, CHOICES) if isinstance(mode, str) else None
    return [f"runtime.offload must be one of {' | '.join(CHOICES)}, got {shown(mode)}" + (f" ({hint})" if hint else "")]


def check_offload(runtime: dict[str, Any], device: torch.device) -> str:
    """The run's offload mode, refused before any weight loads where this device cannot do it."""
    mode = runtime.get("offload", "none") or "none"
    quantize = runtime.get("quantize", "none") or "none"
    if mode == "layers" and device.type != "cuda":
        raise DiffstageError(f"runtime.offload=layers streams the transformer's blocks to a CUDA device, but the run's "
                             f"device is {device}: there is no other device to stream from; use runtime.offload=model "
                             "(the CPU's low-memory mode: modules load for their stages and large ones are released)")
    if mode != "none" and quantize != "none" and device.type == "cpu":
        raise DiffstageError(f"runtime.offload={mode} with runtime.quantize={quantize} on the CPU: released modules "
                             "reload from the checkpoint, which would have to quantize them again every run; use one "
                             "of them (runtime.offload=none or runtime.quantize=none)")
    if mode != "none" and quantize != "none":  # quantized on the CPU, then moved or streamed: never run on a GPU yet
        raise DiffstageError(f"runtime.offload={mode} with runtime.quantize={quantize} is not supported yet (moving "
                             "torchao's quantized weights between devices is untested); use one of them")
    if mode == "layers" and runtime.get("compile") is True:  # the streaming hooks swap the compiled blocks' tensors
        raise DiffstageError("runtime.offload=layers with runtime.compile=true is not supported yet (blocks stream "
                             "their weights in while they run); use runtime.compile=false")
    return mode


def offload_modules(runtime: dict[str, Any], device: torch.device, checked: Any) -> "OffloadedModules | None":
    """What the loader fills for runtime.offload (None: none), checked before any weight loads. `checked`: the
    checked model; offload=layers streams the blocks of its denoisers (CheckedModel.denoisers)."""
    mode = check_offload(runtime, device)
    if mode == "none":
        return None
    return OffloadedModules(mode, device, set(checked.denoisers()))


def offload_hooks(modules: "OffloadedModules | None", stages: list[Any]) -> list[RunHook]:
    """The run hook that fills and empties `modules` around `stages` (none without offload, or for layers)."""
    return [OffloadHook(modules, stages)] if modules is not None and modules.entries else []


def tensor_slots(module: torch.nn.Module) -> Iterator[tuple[str, dict, str]]:
    """(name, the dict that holds it, its key there) for every parameter, buffer and tensor attribute."""
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for holder in (sub._parameters, sub._buffers):
            for key, value in holder.items():
                if value is not None:
                    yield dot + key, holder, key
        for key, value in vars(sub).items():  # computed at init, not registered (e.g. cached frequencies)
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                yield dot + key, sub.__dict__, key


def weight_bytes(module: torch.nn.Module) -> int:
    """What the module's tensors hold (tied ones once); meta tensors count what they stand for."""
    seen = {}
    for _, holder, key in tensor_slots(module):
        seen[id(holder[key])] = holder[key].numel() * holder[key].element_size()
    return sum(seen.values())


def release(module: torch.nn.Module) -> None:
    """Replace every tensor of `module` by a meta tensor of its shape and dtype: the object stays, the memory goes."""
    for _, holder, key in list(tensor_slots(module)):
        value = holder[key]
        empty = torch.empty_like(value, device="meta")
        holder[key] = torch.nn.Parameter(empty, requires_grad=False) if isinstance(value, torch.nn.Parameter) else empty


def adopt(module: torch.nn.Module, loaded: torch.nn.Module, name: str) -> None:
    """Give `module` (built empty) the tensors of `loaded` (the same class and config, just loaded), by name."""
    source = {n: holder[key] for n, holder, key in tensor_slots(loaded)}
    slots = list(tensor_slots(module))
    wrong = sorted({n for n, _, _ in slots} ^ set(source))
    wrong += [f"{n} {tuple(holder[key].shape)} (loaded {tuple(source[n].shape)})" for n, holder, key in slots
              if n in source and holder[key].shape != source[n].shape]
    if wrong:
        raise LoadError(f"runtime.offload: module '{name}' built without weights does not match the loaded one "
                        f"({', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}); use runtime.offload=none")
    for n, holder, key in slots:
        holder[key] = source[n]


def empty_module(cls: type, folder: Path, dtype: torch.dtype) -> torch.nn.Module | None:
    """An instance of `cls` configured from `folder`'s config with its weights on the meta device (nothing read
    or allocated), built the way the library's own loading builds it before the weights go in; None for a class
    this does not know (it is then loaded once and released, to learn its structure)."""
    from .native import NativeModel

    with torch.device("meta"):
        if issubclass(cls, NativeModel):
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
            module = cls(**{k: v for k, v in config.items() if k in accepted})
        elif cls.__module__.startswith("diffusers."):
            module = cls.from_config(cls.load_config(folder))
        elif cls.__module__.startswith("transformers.") and hasattr(cls, "config_class"):
            module = cls(cls.config_class.from_pretrained(folder))
        else:
            return None
    if dtype != torch.float32:  # built in float32; Diffusers logs about every cast of a module it made
        logger = logging.getLogger("diffusers")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            module = module.to(dtype)
        finally:
            logger.setLevel(level)
    return module.eval().requires_grad_(False)


class Offloaded:
    """One module of an offloading pipeline: the object the stages hold, and how to fill it."""

    def __init__(self, name: str, module: torch.nn.Module, load: Callable[[], torch.nn.Module] | None):
        self.name, self.module, self.load = name, module, load  # load: a freshly loaded copy (CPU mode)
        self.nbytes = weight_bytes(module)
        self.present = False  # CPU mode: its weights are loaded; CUDA: it is on the GPU
        self.releasable = False  # CPU mode: large enough to release after its stages (see OffloadedModules)


class OffloadedModules:
    """The weight modules of one pipeline in an offload mode, filled in by the loader (`add`), loaded and
    released (CPU) or moved (CUDA) by OffloadHook."""

    def __init__(self, mode: str, device: torch.device, denoisers: set[str] = frozenset()):
        self.mode, self.device, self.denoisers = mode, torch.device(device), set(denoisers)
        self.entries: dict[str, Offloaded] = {}
        self.streamers: list[Any] = []  # offload=layers: one per denoiser (offload_layers.BlockStreamer)

    @property
    def lazy(self) -> bool:
        return self.mode == "model" and self.device.type == "cpu"

    def add(self, name: str, cls: type, folder: Path, dtype: torch.dtype, load: Callable[..., torch.nn.Module],
            options: dict[str, Any] | None) -> torch.nn.Module:
        """The module the stages will hold. `load(device, configure)`: the loader's own load of this module (on
        `device`, configured with the run's execution `options` when `configure`); `options`: None for a module
        without configure_runtime."""
        if self.lazy:
            module = empty_module(cls, folder, dtype)
            if module is None:  # unknown class: load once to learn its structure
                module = load(self.device, configure=False)
                release(module)
            if options is not None:
                module.configure_runtime(**options)
            self.entries[name] = Offloaded(name, module, lambda: load(self.device, configure=False))
            self._mark_releasable()
            return module
        if self.mode == "layers" and name not in self.denoisers:
            return load(self.device, configure=True)  # resident on the GPU, as without offload
        module = load(torch.device("cpu"), configure=options is not None)
        if options is not None and hasattr(module, "ops"):  # configured on the CPU: kernels for the GPU it runs on
            from .kernels import get_kernels

            module.ops = get_kernels(options.get("kernels") or "auto", self.device)
        if self.mode == "layers":
            from .offload_layers import BlockStreamer

            self.streamers.append(BlockStreamer(module, self.device))
            return module
        self.entries[name] = Offloaded(name, module, None)
        return module

    def _mark_releasable(self) -> None:
        total = sum(e.nbytes for e in self.entries.values())
        for entry in self.entries.values():
            entry.releasable = entry.nbytes >= RELEASE_SHARE * total

    def fill(self, name: str) -> None:
        """Make module `name` usable: load its weights (CPU) or move it to the GPU."""
        entry = self.entries.get(name)
        if entry is None or entry.present:
            return
        if entry.load is not None:
            adopt(entry.module, entry.load(), name)
            log.info("offload: loaded %s (%.1f MiB)", name, entry.nbytes / 2 ** 20)
        else:
            entry.module.to(self.device)
        entry.present = True

    def empty(self, name: str) -> None:
        """Release module `name`'s weights (CPU) or move it back to the CPU; small ones stay in CPU mode."""
        entry = self.entries.get(name)
        if entry is None or not entry.present or (entry.load is not None and not entry.releasable):
            return
        if entry.load is not None:
            release(entry.module)
            log.info("offload: released %s", name)
        else:
            entry.module.to("cpu")
        entry.present = False


def stage_modules(stage: Any, names: list[str]) -> list[str]:
    """The modules `stage` uses, by the names of the pipeline's modules (a stage that takes them all: all)."""
    contract = getattr(stage, "declared", None)
    if getattr(stage, "takes_all_modules", False) or contract is None:
        return list(names)
    return [n for n in contract.modules.values() if n in names]


class OffloadHook(RunHook):
    """Fills each stage's modules before it runs and empties those no later stage of the run uses after it;
    leaving a run (finished or failed) empties them all."""

    def __init__(self, modules: OffloadedModules, stages: list[Any]):
        self.modules, self.stages = modules, stages

    @contextlib.contextmanager
    def around_run(self, req: Any) -> Iterator[None]:
        try:
            yield
        finally:
            for name in self.modules.entries:
                self.modules.empty(name)

    def before_stage(self, stage: Any, req: Any) -> None:
        for name in stage_modules(stage, list(self.modules.entries)):
            self.modules.fill(name)

    def after_stage(self, stage: Any, req: Any) -> None:
        index = next((i for i, s in enumerate(self.stages) if s is stage), None)
        if index is None:  # a stage this hook was not built with: keep everything until the run ends
            return
        later = {n for s in self.stages[index + 1:] for n in stage_modules(s, list(self.modules.entries))}
        for name in stage_modules(stage, list(self.modules.entries)):
            if name not in later:
                self.modules.empty(name)

    def memory_estimate(self, stages: list[Any], req: Any) -> dict[str, int]:
        """The most memory the modules this hook fills will take beyond what is filled now, walking the stages
        as a run does (Pipeline.check_request adds it to the stages' estimates)."""
        entries = self.modules.entries
        added: set[str] = set()  # filled during the walk (those filled now are in memory already)
        extra = peak = 0
        for index, stage in enumerate(stages):
            for name in stage_modules(stage, list(entries)):
                if name not in added and not entries[name].present:
                    added.add(name)
                    extra += entries[name].nbytes
            peak = max(peak, extra)
            later = {n for s in stages[index + 1:] for n in stage_modules(s, list(entries))}
            for name in stage_modules(stage, list(entries)):
                entry = entries[name]
                if name in added and name not in later and (entry.load is None or entry.releasable):
                    added.discard(name)
                    extra -= entry.nbytes
        return {"weights loaded for their stages (runtime.offload)": peak} if peak else {}
