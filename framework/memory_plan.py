"""The memory a run needs, per stage, before any weight loads (`diffstage validate MODEL --memory`).

Weights come from the checkpoint's safetensors headers (dtypes and shapes, no tensor read), converted to what
the run keeps in memory: floating tensors in the module's dtype (runtime.dtype, or its YAML dtype), a native
module's Linear weights in runtime.matmul_dtype, and a quantized module's Linear weights at 1 byte each plus a
scale and a 1-byte zero point per output row (torchao's int8 layout). Which tensors are Linear weights is read
from the module built on the meta device (no memory). Activations are each stage's own `memory_estimate(req)`
(memory.py), asked of stages made with those meta modules, and counted from that stage to the end of the run
(as the pre-run check adds them all up). Resident while a stage runs: with runtime.offload=none every module,
with offload=model or layers only the stage's own (layers streams blocks too: counted like model, an upper
bound); the LoRA files of `lora=[...]` are counted in every stage (they stay beside the modules they adapt)."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import loader
from .build_plan import BuildPlan, execution_options, instantiate_stage, model_settings
from .errors import DiffstageError, LoraError
from .lora_files import file_identity
from .memory import format_bytes
from .offload import RELEASE_SHARE, check_offload, empty_module
from .pretrained import from_pretrained, module_kind
from .quantize import check_quantize_backend, quantize_targets
from .stage import PipelineStage
from .torch_utils import parse_device, parse_dtype
from .checkpoint_files import shard_files
from .weight_files import MAX_HEADER_BYTES, PICKLE_SUFFIXES, safetensors_header_problem

FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class StageMemory:
    label: str  # "4:DenoisingStage"
    modules: list[str]  # the modules resident while it runs
    weights: int
    activations: dict[str, int]  # live while it runs: its own and those of the stages before it
    note: str = ""  # why its activations are not counted, when they are not

    @property
    def total(self) -> int:
        return self.weights + sum(self.activations.values())


@dataclass
class MemoryPlan:
    model: str
    checkpoint: str
    request: dict[str, Any]
    runtime: dict[str, Any]
    checkpoint_bytes: dict[str, int]  # module -> bytes of its safetensors tensors as stored
    weights: dict[str, int]  # module -> bytes as this run keeps it
    lora: dict[str, int] = field(default_factory=dict)  # adapter file -> bytes
    loading: dict[str, int] = field(default_factory=dict)  # quantized module -> its bytes before quantization
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)


def safetensors_tensors(file: Path) -> dict[str, dict]:
    """name -> {dtype, shape, data_offsets} from a safetensors file's header (no tensor is read)."""
    problem = safetensors_header_problem(file)
    if problem:
        raise DiffstageError(f"{file} is not a safetensors file ({problem})")
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(length, MAX_HEADER_BYTES)))
    return {k: v for k, v in header.items() if k != "__metadata__"}


def module_tensors(folder: Path) -> dict[str, dict]:
    """Every tensor of a module folder: the shards its safetensors index names, else its *.safetensors files."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    files = [f for index in indexes for f in shard_files(index)] or sorted(folder.glob("*.safetensors"))
    return {name: info for file in files for name, info in safetensors_tensors(file).items()}


def tensor_bytes(info: dict) -> int:
    begin, end = info["data_offsets"]
    return end - begin


def linear_parameters(module: torch.nn.Module | None) -> set[str]:
    """The names of a module's nn.Linear parameters (weights and biases)."""
    if module is None:
        return set()
    return {f"{prefix}.{name}" for prefix, m in module.named_modules() if isinstance(m, torch.nn.Linear)
            for name, _ in m.named_parameters(recurse=False)}


def kept_bytes(tensors: dict[str, dict], dtype: torch.dtype, linear: set[str], linear_dtype: torch.dtype | None,
               quantized: bool) -> int:
    """Bytes of `tensors` as the run keeps them (see the module docstring); `linear`: the Linear parameters'
    names, read from a meta module (without one: the 2-D `.weight` tensors, for a quantized module)."""
    total = 0
    for name, info in tensors.items():
        size, itemsize = tensor_bytes(info), FLOAT_DTYPES.get(info.get("dtype"))
        if itemsize is None:  # integer and bool tensors are loaded as they are
            total += size
            continue
        numel = size // itemsize
        is_linear = name in linear or (not linear and name.endswith(".weight") and len(info["shape"]) == 2)
        if quantized and is_linear and name.endswith(".weight"):
            total += numel + (dtype.itemsize + 1) * info["shape"][0]  # 1 byte a weight; a row's scale, zero point
        elif is_linear and linear_dtype is not None:
            total += numel * linear_dtype.itemsize
        else:
            total += numel * dtype.itemsize
    return total


def meta_module(cls: type, folder: Path, dtype: torch.dtype) -> torch.nn.Module | None:
    """The module built from its config on the meta device (offload.empty_module: no memory), or None when its
    class cannot be built so; the estimate then goes without its Linear names and its stages' activations."""
    try:
        return empty_module(cls, folder, dtype)
    except Exception:
        return None


def lora_files(run_plain: dict[str, Any]) -> dict[str, int]:
    """Adapter file -> its size, for the run config's `lora` list."""
    out = {}
    for i, entry in enumerate(run_plain.get("lora") or []):  # entries were checked with the run config
        try:
            out[entry["path"]] = file_identity(entry["path"])[1]  # as a run reads it (~ expanded, a file)
        except LoraError as e:
            raise DiffstageError(f"lora[{i}].path: {e}") from None
    return out


@dataclass
class _Modules:
    """What the estimate knows of each module of the model."""

    stored: dict[str, int] = field(default_factory=dict)  # torch modules: bytes in the checkpoint
    kept: dict[str, int] = field(default_factory=dict)  # torch modules: bytes as this run keeps them
    objects: dict[str, Any] = field(default_factory=dict)  # meta modules, and the config-only ones loaded
    quantized: dict[str, int] = field(default_factory=dict)  # quantized module -> bytes before quantization


def _read_modules(plan: BuildPlan, device: torch.device) -> _Modules:
    run, checked, spec = plan.run, plan.checked, plan.checked.spec
    root, index, subfolders = loader.checkpoint_folders(spec, plan.model_path())
    classes = {name: loader.module_class(spec, name, index, checked.allowlist) for name in subfolders}
    quantize = quantize_targets(run.runtime, checked)
    execution = execution_options(run, spec, device)
    out = _Modules()
    for name, sub in subfolders.items():
        cls, folder = classes[name], root / sub
        dtype = parse_dtype(spec.module_spec(name).dtype or run.runtime.get("dtype", "float32"))
        if module_kind(cls) == "config":  # tokenizers, schedulers: small, and stages take them
            out.objects[name] = from_pretrained(cls, root, sub, dtype, run.allow_pickle, None)
            continue
        module = meta_module(cls, folder, dtype)
        if module is not None:
            out.objects[name] = module
        linear_dtype = None
        if hasattr(cls, "configure_runtime") and name not in quantize:
            narrow = loader._runtime_for(name, cls, folder, execution, dtype, device).get("matmul_dtype")
            linear_dtype = parse_dtype(narrow) if narrow else None
        tensors = module_tensors(folder)
        if not tensors:  # pickle weights (allow_pickle): no header to read without unpickling; their file sizes
            out.stored[name] = out.kept[name] = sum(f.stat().st_size for f in folder.iterdir()
                                                    if f.suffix in PICKLE_SUFFIXES and f.is_file())
            continue
        out.stored[name] = sum(tensor_bytes(t) for t in tensors.values())
        out.kept[name] = kept_bytes(tensors, dtype, linear_parameters(module), linear_dtype, name in quantize)
        if name in quantize:  # it loads in `dtype`, then is quantized
            out.quantized[name] = kept_bytes(tensors, dtype, set(), None, False)
    return out


def _activations(plan: BuildPlan, planned, modules: _Modules, req) -> tuple[dict[str, int], str]:
    """A stage's own memory estimate for `req` (made with the meta modules), and a note when it has none."""
    if planned.cls.memory_estimate is PipelineStage.memory_estimate:  # the default: it allocates nothing large
        return {}, ""
    stage = plan.early.get(planned.index)
    try:
        if stage is None:
            settings = model_settings(plan.checked, plan.model_path())
            stage = instantiate_stage(planned, plan.checked, modules.objects, plan.model_path(), settings)
        return stage.memory_estimate(req), ""
    except Exception as e:  # a module not built on the meta device: say so rather than guess
        return {}, f"activations unknown ({type(e).__name__})"


def _resident(plan: BuildPlan, kept: dict[str, int], offload: str, device: torch.device) -> dict[int, list[str]]:
    """Stage index -> the weight modules in memory while it runs. offload=none: all. model (offload.py): a module
    from the first stage that uses it to the last; on the CPU one under RELEASE_SHARE of all the weights stays once
    loaded. layers: the denoisers from their first stage to their last, every other module all run."""
    plan_stages = plan.checked.plan
    if offload not in ("model", "layers"):
        return {p.index: sorted(kept) for p in plan_stages}
    spans: dict[str, tuple[int, int]] = {}
    for p in plan_stages:
        uses = kept if p.cls.takes_all_modules else {n for n in p.contract.modules.values() if n in kept}
        for name in uses:
            spans[name] = (spans.get(name, (p.index, p.index))[0], p.index)
    small = {n for n, size in kept.items() if size < RELEASE_SHARE * sum(kept.values())} if device.type == "cpu" else set()
    if offload == "layers":  # only the denoisers stream (counted whole in their stages: an upper bound); the rest stay
        small = set(kept) - set(plan.checked.denoisers())
        spans = {n: (0 if n in small else first, last) for n, (first, last) in spans.items()}
    return {p.index: sorted(n for n, (first, last) in spans.items()
                            if first <= p.index <= last or (n in small and first <= p.index)) for p in plan_stages}


def estimate_memory(plan: BuildPlan) -> MemoryPlan:
    """The estimate for the run `plan` describes (its request: the run config's prompt and sampling keys)."""
    run, checked = plan.run, plan.checked
    req = plan.request(prompt=run.prompt, seed=run.seed)
    device = parse_device(run.runtime.get("device", "cpu"))
    offload = check_offload(run.runtime, device)  # refused as a run would refuse it
    check_quantize_backend(run.runtime.get("quantize", "none"), device)
    lora = lora_files(run.plain)
    modules = _read_modules(plan, device)
    memory = MemoryPlan(checked.spec.name, str(plan.model_path()),
                        {"height": req.height, "width": req.width, "images": req.requested_batch_size()},
                        {k: run.runtime.get(k) for k in ("device", "dtype", "offload", "quantize")},
                        modules.stored, modules.kept, lora, modules.quantized)
    if modules.quantized:
        memory.runtime["quantize"] += f" ({', '.join(modules.quantized)})"
    resident = _resident(plan, modules.kept, offload, device)
    live: dict[str, int] = {}  # a stage's activations count from it to the end (the pre-run check adds all up)
    for planned in checked.plan:
        activations, note = _activations(plan, planned, modules, req)
        for what, n in activations.items():
            live[what] = live.get(what, 0) + n
        names = resident[planned.index]
        memory.stages.append(StageMemory(f"{planned.index}:{planned.cls.__name__}", names,
                                         sum(modules.kept[n] for n in names) + sum(lora.values()), dict(live), note))
    return memory


def format_memory_plan(memory: MemoryPlan) -> str:
    """The estimate as the CLI prints it."""
    r = memory.request
    lines = [f"memory estimate for model '{memory.model}' ({memory.checkpoint}), no weights loaded",
             f"  request: {r['height']}x{r['width']}, {r['images']} image(s); runtime: "
             + ", ".join(f"{k} {v}" for k, v in memory.runtime.items()),
             "  weights (in the checkpoint -> as this run keeps them):"]
    width = max(len(n) for n in [*memory.weights, *memory.lora, "x"])
    lines += [f"    {name:{width}}  {format_bytes(memory.checkpoint_bytes[name])} -> {format_bytes(kept)}"
              for name, kept in memory.weights.items()]
    lines += [f"    lora {name}  {format_bytes(size)}" for name, size in memory.lora.items()]
    lines.append("  per stage (weights resident + activations = total):")
    label_width = max(len(s.label) for s in memory.stages)
    for s in memory.stages:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in s.activations.items())
        lines.append(f"    {s.label:{label_width}}  {format_bytes(s.weights)} + {format_bytes(sum(s.activations.values()))}"
                     f" = {format_bytes(s.total)}" + (f"  ({parts})" if parts else "") + (f"  {s.note}" if s.note else ""))
    peak = memory.peak
    lines.append(f"  peak: {format_bytes(peak.total)} in {peak.label} (resident: {', '.join(peak.modules) or 'none'})")
    if memory.loading:  # quantization happens after a module loads: the weights are whole for a moment
        before = sum(memory.weights.values()) + max(memory.loading[n] - memory.weights[n] for n in memory.loading)
        lines.append(f"  while loading: up to {format_bytes(before)} of weights (a module is quantized after it "
                     f"loads in {memory.runtime['dtype']})")
    return "\n".join(lines) + "\n"
