"""The LoRA adapters of a pipeline: loaded once per file, chosen per request, optionally fused.

Each adapted Linear gets one forward hook (shared by every pipeline that holds the module) that adds
sum_i scale_i * scaling_i * B_i(A_i(x)) for the adapters of the run in progress. The run's adapters live in a
context variable that `LoraAdapters.around_run` sets (to an empty set when the request has none), so
switching adapters between requests reads no file and changes no weight, and a run of another pipeline
sharing the module (the session's module cache shares modules between pipelines) adds nothing of this one's.

Fusing merges one set into the weights (no hook work per call). The modules are then no longer the ones
the checkpoint holds, so fusing is refused while another pipeline holds one of them, and the fused module
leaves the session's module cache (later builds load their own); unfusing restores the saved weights."""
from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import LoraError
from .lora_files import LoraFile, file_identity, load_lora_file, lora_list_problems
from .run_hooks import RunHook

# Linear module -> [(Delta, factor)] of the run in progress in this context (thread).
_ACTIVE: ContextVar[dict | None] = ContextVar("diffstage_lora_active", default=None)
MAX_CACHED_FILES = 32  # adapter files a pipeline keeps loaded (least recently used go first)
# module -> the LoraAdapters (one per pipeline) holding it: fusing refuses a module another pipeline holds.
_HOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.compiler.disable  # inside a compiled block (runtime.compile) it runs eagerly: the adapters change per run
def _add_adapters(linear: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of an adapted Linear: its output plus the active adapters' (peft's order and dtypes)."""
    active = _ACTIVE.get()
    deltas = active.get(linear) if active else None
    if not deltas:
        return None
    x = args[0]
    for delta, factor in deltas:
        down, up, bias = delta.on(x.device)
        output = output + (F.linear(F.linear(x.to(down.dtype), down), up, bias) * factor).to(output.dtype)
    return output


_HOOK_LOCK = threading.Lock()  # two pipelines sharing a module may prepare adapters for it in two threads


def _hook(linear: torch.nn.Module) -> None:
    """Give `linear` the adapter hook, once (it does nothing while no run of an adapter's pipeline is on)."""
    with _HOOK_LOCK:
        if not getattr(linear, "_diffstage_lora_hook", False):
            linear.register_forward_hook(_add_adapters)
            linear._diffstage_lora_hook = True


@dataclass(frozen=True)
class Delta:
    """One adapted layer, ready to apply: its Linear, A and B in the Linear's dtype, alpha / r."""

    linear: torch.nn.Linear
    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    scaling: float
    _moved: dict = field(default_factory=dict, compare=False, repr=False)  # device -> copies (offloaded modules)

    def on(self, device: torch.device) -> tuple:
        """A, B and the bias on `device`: where the module runs now (offload moves modules between devices)."""
        if self.down.device == device:
            return self.down, self.up, self.bias
        if device not in self._moved:
            self._moved[device] = tuple(t.to(device) if t is not None else None for t in (self.down, self.up, self.bias))
        return self._moved[device]


@dataclass(frozen=True)
class Adapter:
    file: LoraFile
    deltas: tuple[Delta, ...]
    modules: frozenset[str]  # the model YAML's names of the modules it adapts


def compiled_layer(adapter: Adapter, modules: dict[str, torch.nn.Module]) -> str | None:
    """The first layer of `adapter` inside a block that torch.compile wraps (runtime.compile of this pipeline, or
    of another sharing the module, maybe after this adapter was prepared): compiled code traced without the hook
    never calls it (hooks added later are not guarded), so such a layer can take adapters only fused."""
    inside: set[int] = set()
    for name in adapter.modules:
        for block in modules[name].modules():
            if getattr(block, "_compiled_call_impl", None) is not None:
                inside.update(id(m) for m in block.modules())
    return next((f"{layer.module}.{layer.path}" for layer, d in zip(adapter.file.layers, adapter.deltas)
                 if id(d.linear) in inside), None)


def prepare(file: LoraFile, modules: dict[str, torch.nn.Module]) -> Adapter:
    deltas = []
    for layer in file.layers:
        linear = modules[layer.module].get_submodule(layer.path)
        # the weights' device, unless they are not loaded yet (runtime.offload builds modules empty)
        like = dict(device=linear.weight.device if not linear.weight.is_meta else "cpu", dtype=linear.weight.dtype)
        bias = layer.up_bias.to(**like) if layer.up_bias is not None else None
        deltas.append(Delta(linear, layer.down.to(**like), layer.up.to(**like), bias, layer.scaling))
    return Adapter(file, tuple(deltas), frozenset(layer.module for layer in file.layers))


Chosen = tuple[tuple[Adapter, float], ...]  # the adapters of a run with their scales (none at scale 0)


def signature(chosen: Chosen, names: set[str] | None = None) -> tuple:
    """What a set of adapters is (file identity and scale), optionally only those adapting `names`."""
    return tuple((adapter.file.identity, scale) for adapter, scale in chosen
                 if names is None or adapter.modules & names)


class LoraAdapters(RunHook):
    """The adapters of one pipeline. `default`: the run config's `lora` list, checked (and loaded) now;
    `release(module)`: takes a fused module out of the session's module cache; `unfusable`: why fusing is
    refused, if it is."""

    def __init__(self, modules: dict[str, Any], allow_pickle: bool = False, default: Any = None,
                 release: Callable[[Any], None] | None = None, unfusable: str | None = None):
        self.modules = {name: m for name, m in modules.items() if isinstance(m, torch.nn.Module)}
        self.allow_pickle = allow_pickle
        self.release = release
        self.unfusable = unfusable  # why fusing cannot work in this pipeline (runtime.offload reloads weights)
        self._loaded: OrderedDict[str, Adapter] = OrderedDict()  # resolved path -> its adapter, least recent first
        self._run: Chosen = ()  # the run in progress
        self._fused: Chosen = ()
        self._saved: dict[torch.nn.Linear, tuple] = {}  # weights before fusing
        self._default_before_fuse: Any = None
        for module in self.modules.values():
            _HOLDERS.setdefault(module, weakref.WeakSet()).add(self)
        _refuse_compiled(self.choose(default, "lora"), self.modules)  # at build, not at the first run

    def adapter(self, path: Any) -> Adapter:
        """The adapter in the file at `path`, read and checked once per file version."""
        identity = file_identity(path)
        cached = self._loaded.get(identity[0])
        if cached is None or cached.file.identity != identity:
            cached = self._loaded[identity[0]] = prepare(load_lora_file(path, self.modules, self.allow_pickle),
                                                         self.modules)
        self._loaded.move_to_end(identity[0])
        while len(self._loaded) > MAX_CACHED_FILES:  # a server cycling through many adapters keeps the recent ones
            self._loaded.popitem(last=False)
        return cached

    def choose(self, entries: Any, key: str) -> Chosen:
        """The adapters a `lora`/`loras` list asks for, every file read and checked before any is used."""
        problems = lora_list_problems(entries, key)
        if problems:
            raise LoraError(f"invalid {key}:\n" + "\n".join(f"  - {p}" for p in problems))
        chosen = tuple((self.adapter(e["path"]), float(e.get("scale", 1.0))) for e in entries or ())
        return tuple((adapter, scale) for adapter, scale in chosen if scale != 0)

    @contextlib.contextmanager
    def around_run(self, req: Any) -> Iterator[None]:
        chosen = self.choose(req.loras, "loras")
        if self._fused:
            if signature(chosen) != signature(self._fused):
                raise LoraError(f"this pipeline has LoRA adapters fused into its weights ({_paths(self._fused)}); a "
                                f"request for another set ({_paths(chosen) or 'none'}) needs pipe.unfuse_loras() first")
            chosen = ()  # already in the weights
        _refuse_compiled(chosen, self.modules)  # every run: another pipeline may have compiled a shared block since
        active: dict = {}
        for adapter, scale in chosen:
            for d in adapter.deltas:
                _hook(d.linear)  # at first use only: a hook inside a compiled block breaks its graph for everyone
                active.setdefault(d.linear, []).append((d, d.scaling * scale))
        self._run = chosen
        token = _ACTIVE.set(active)  # set even when empty: a run nested in another's adds nothing of it
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            self._run = ()

    def memory_estimate(self, stages: list[Any], req: Any) -> dict[str, int]:
        """The adapter files of `req` not read yet (they load as its run starts), at their size on disk."""
        if lora_list_problems(req.loras, "loras"):  # the run refuses it with its own message
            return {}
        new = {}
        for entry in req.loras or ():
            try:
                identity = file_identity(entry["path"])
            except LoraError:
                continue
            cached = self._loaded.get(identity[0])
            if cached is None or cached.file.identity != identity:
                new[identity] = identity[1]  # a file listed twice loads once
        return {"LoRA adapters to load": sum(new.values())} if new else {}

    def module_key(self, module: Any, key: str, req: Any) -> str:
        """A module with adapters in this run (or fused) computes something else: its outputs get another key."""
        names = {name for name, m in self.modules.items() if m is module}
        parts = [*signature(self._run, names), *(("fused",) + s for s in signature(self._fused, names))]
        return f"{key} lora={parts!r}" if parts else key

    def fuse(self, entries: Any, default: Any = None) -> Any:
        """Merge the adapters of `entries` into the weights; returns them, the new default of the pipeline.
        `default`: the default before, which unfuse returns."""
        if self.unfusable:
            raise LoraError(f"cannot fuse LoRA adapters: {self.unfusable}; use them unfused (pipe(..., loras=...))")
        if self._fused:
            raise LoraError(f"LoRA adapters are fused already ({_paths(self._fused)}); call pipe.unfuse_loras() first")
        chosen = self.choose(entries, "loras")
        names = {name for adapter, _ in chosen for name in adapter.modules}
        self._refuse_shared(names)
        for adapter, _ in chosen:  # everything checked before any weight changes
            for d in adapter.deltas:
                if type(d.linear.weight) not in (torch.Tensor, torch.nn.Parameter):  # runtime.quantize's int8/fp8
                    raise LoraError(f"LoRA file {adapter.file.path}: cannot fuse into a quantized layer (its weight is "
                                    f"a {type(d.linear.weight).__name__}, runtime.quantize); use the adapters unfused "
                                    "(pipe(..., loras=...)), which work on quantized layers")
                if d.bias is not None and d.linear.bias is None:
                    raise LoraError(f"LoRA file {adapter.file.path}: a lora_B bias for a Linear without bias "
                                    "cannot be fused (use it unfused)")
        with torch.no_grad():
            for adapter, scale in chosen:
                for d in adapter.deltas:
                    self._saved.setdefault(d.linear, (d.linear.weight.detach().clone(),
                                                      None if d.linear.bias is None else d.linear.bias.detach().clone()))
                    d.linear.weight += (d.up.float() @ d.down.float() * (d.scaling * scale)).to(d.linear.weight.dtype)
                    if d.bias is not None:
                        d.linear.bias += (d.bias.float() * (d.scaling * scale)).to(d.linear.bias.dtype)
        for name in names:
            if self.release is not None:
                self.release(self.modules[name])
        self._fused, self._default_before_fuse = chosen, default
        return list(entries or [])

    def unfuse(self) -> Any:
        """Restore the weights saved before fusing; returns the pipeline's default set from before."""
        if not self._fused:
            raise LoraError("no LoRA adapters are fused into this pipeline's weights (pipe.fuse_loras fuses them)")
        with torch.no_grad():
            for linear, (weight, bias) in self._saved.items():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
        self._saved, self._fused = {}, ()
        return self._default_before_fuse

    def _refuse_shared(self, names: set[str]) -> None:
        gc.collect()  # pipelines dropped but not yet collected hold nothing
        for name in sorted(names):
            others = [h for h in _HOLDERS.get(self.modules[name], ()) if h is not self]
            if others:
                raise LoraError(f"cannot fuse LoRA adapters into module '{name}': {len(others)} other pipeline(s) in "
                                "this process hold the same module (built from the same checkpoint), and fusing "
                                "changes its weights for them too; build this pipeline in its own session "
                                "(build_pipeline(..., session=diffstage.Session())) or use the adapters unfused")


def _refuse_compiled(chosen: Chosen, modules: dict[str, torch.nn.Module]) -> None:
    for adapter, _ in chosen:
        layer = compiled_layer(adapter, modules)
        if layer:
            raise LoraError(f"LoRA file {adapter.file.path}: layer '{layer}' is in a block that "
                            "runtime.compile compiled, whose code does not call the adapters; fuse them "
                            "(pipe.fuse_loras) or build with runtime.compile=false")


def _paths(chosen: Chosen) -> str:
    return ", ".join(f"{adapter.file.path} x{scale:g}" for adapter, scale in chosen)
