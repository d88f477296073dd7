"""From a checked model and a run config to a Pipeline, in two steps:

    plan = plan_build(run, checked)   # no weights: sampling defaults, the stages that need none
    req = plan.request(prompt=...)    # optional: a request built and checked before any weight loads
    pipe = plan.load(session)         # weights, the remaining stages, the Pipeline, complete

Each object is made complete: a stage gets its callbacks, settings and contract when it is wired,
the Pipeline its reuse cache and module keys when it is constructed."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from . import loader
from .attention import get_backend
from .attention.layer import DEFAULT_BACKEND
from .acceleration_check import check_before_load, locator
from .attention.route import install_attention_route
from .block_cache import install_block_cache
from .check import PlannedStage
from .distributed import init_parallel
from .distributed.split_plan import install_sequence_plan
from .errors import DiffstageError
from .kernels import resolve_kernels
from .lora import LoraAdapters
from .model_check import CheckedModel
from .offload import offload_hooks, offload_modules
from .regional_compile import compile_blocks
from .pipeline import Pipeline, checked_request
from .quantize import check_quantize_backend, quantize_targets
from .req import Req
from .resolve import callback_allowlist, given_object, resolve
from .run_config import RunConfig, check_sampling_keys, parse_run_config
from .session import Session
from .spec import ModelSpec
from .stage import PipelineStage, Settings
from .step_cache import StepCache, make_step_cache
from .torch_utils import parse_device, parse_dtype
from .vae_decode import attach_decode_options


def _substitute(value: Any, path: tuple, obj: Any) -> Any:
    """Return a copy of `value` with the item at `path` replaced by `obj`."""
    if not path:
        return obj
    value = copy.copy(value)
    value[path[0]] = _substitute(value[path[0]], path[1:], obj)
    return value


def model_settings(checked: CheckedModel, model_path: str | Path | None = None) -> dict[str, Any]:
    """What callbacks read as `settings`: pipeline_config.settings, and each checkpoint_settings key from the
    checkpoint's model_index.json (its YAML default when the checkpoint has none, or none is known yet)."""
    pc = checked.spec.pipeline_config
    index = {}
    if pc.checkpoint_settings and model_path is not None:
        index = loader.read_json_object(loader.resolve_checkpoint(model_path, ()) / "model_index.json")
    values = {k: index.get(k, default) for k, default in pc.checkpoint_settings.items()}
    for key, value in values.items():
        default = pc.checkpoint_settings[key]
        if default is not None and value is not None and _kind(value) != _kind(default):
            raise DiffstageError(f"model_index.json of '{model_path}' gives {key} = {value!r}, but model "
                                 f"'{checked.spec.name}' expects a {_kind(default)} there (checkpoint_settings."
                                 f"{key}: {default!r})")
    return {**pc.settings, **values}


def _kind(value: Any) -> str:
    """A JSON value's kind: bool, number, string, list or mapping."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def instantiate_stage(planned: PlannedStage, checked: CheckedModel, modules: dict[str, Any],
                      model_path: str | Path | None = None, settings: dict[str, Any] | None = None) -> PipelineStage:
    """Make the stage `planned` describes, with its modules, and wire it (callbacks, `settings`: by default the
    model's, checkpoint_settings at their YAML defaults; contract)."""
    args = dict(planned.args)
    if planned.cls.takes_all_modules:
        args["modules"] = dict(modules)
        args["pipeline_class"] = loader.pipeline_class(model_path, checked.allowlist)
    for arg_path, module_name in planned.contract.modules.items():
        top = arg_path[0]
        args[top] = _substitute(args.get(top, module_name), arg_path[1:], modules[module_name])
    target = checked.data["stages"][planned.index]["_target_"]
    cls = resolve(target, checked.allowlist)  # allowlist again, right before Hydra imports it
    # Hydra makes the factory; the arguments never pass through OmegaConf, so a nested
    # `_target_` is not instantiated and `${oc.env:...}` is not interpolated: YAML data stays data.
    # A class a Python caller handed over (PipelineBuilder) may have no import path: it is used as it is.
    factory = cls if given_object(target) is not None else instantiate({"_target_": target, "_partial_": True})
    try:
        stage = factory(**args)
    except Exception as e:  # the stage rejected its arguments: point at them
        file, line = checked.lines.where(("stages", planned.index))
        raise DiffstageError(f"{file}:{line}: stages[{planned.index}]: {planned.cls.__name__} could not be "
                             f"created: {type(e).__name__}: {e}") from None
    pc = checked.spec.pipeline_config
    group = pc.callbacks.get(planned.cls.callback_group(), {})
    callbacks = callback_allowlist(checked.allowlist)  # not diffusers./transformers./torch. functions
    settings = model_settings(checked) if settings is None else settings
    stage.bind({name: resolve(path, callbacks) for name, path in group.items()}, settings, sources=group,
               contract=planned.contract)
    return stage


def execution_options(cfg: Any, spec: ModelSpec, device: torch.device, planned_images: int | None = 1) -> dict[str, Any]:
    """How native modules run: attention backend (command line, else model YAML, else sdpa),
    kernels, regional compilation and matmul dtype; checked here so a typo fails before weights load.
    `auto` compile and matmul dtype are decided per model when it loads (NativeModel.resolve_runtime);
    `planned_images` (how many images this run will make; None: unknown) informs the compile choice.
    `cfg`: a RunConfig (or a run config mapping, checked first)."""
    run = parse_run_config(cfg)
    backend = run.attention_backend or spec.attention or DEFAULT_BACKEND
    get_backend(backend)
    kernels = str(run.runtime.get("kernels") or "auto")
    resolve_kernels(kernels, device)
    matmul_dtype = run.runtime.get("matmul_dtype")
    if matmul_dtype not in (None, "auto"):
        parse_dtype(matmul_dtype)
    return {"attention": backend, "kernels": kernels, "compile": run.runtime.get("compile", False),
            "matmul_dtype": matmul_dtype, "planned_images": planned_images}


def apply_acceleration(checked: CheckedModel, modules: dict[str, Any], execution: dict | None = None) -> list[Any]:
    """The model YAML's `acceleration:` declarations checked against the loaded modules and applied: step
    caches through the declared blocks, the sequence split plan (declared, else the class's _cp_plan), the
    attention modules routed through diffstage's attention, and the blocks compiled when `execution` (the run's
    execution_options) says runtime.compile. Returns the modules whose blocks take a step cache by this
    declaration (a shared module may be wrapped by another's)."""
    cacheable, execution = [], execution or {}
    for name, declared in checked.spec.acceleration.items():
        locate = locator(checked, name)
        if declared.blocks is not None or declared.residual is not None:  # else: no blocks to find
            install_block_cache(modules[name], declared, locate)
        install_sequence_plan(modules[name], declared.sequence, locate)
        install_attention_route(modules[name], declared.attention.local)
        compile_blocks(modules[name], declared, locate, execution.get("compile"), execution.get("planned_images"))
        if declared.residual is not None:
            cacheable.append(modules[name])
    return cacheable


def route_attention(stages: list, backend: str) -> None:
    """The run's attention backend to the stages that run a stock transformer's routed attention."""
    for stage in stages:
        if hasattr(stage, "attention_backend"):
            stage.attention_backend = backend


def attach_step_cache(stages: list, cache: StepCache | None, checked: CheckedModel, declared: list = ()) -> None:
    """Give the step cache to the stages that take one (each DenoisingStage gets its own copy); `declared`: the
    modules whose blocks the model YAML declares for step caches (apply_acceleration)."""
    if cache is None:
        return
    takers = [(i, s) for i, s in enumerate(stages) if hasattr(s, "set_step_cache")]
    if not takers:
        raise DiffstageError(f"cache={cache.kind}: model '{checked.spec.name}' has no stage that takes a step cache "
                             "(DenoisingStage does); use cache=none")
    for i, stage in takers:
        try:
            stage.set_step_cache(copy.deepcopy(cache), declared)
        except ValueError as e:
            file, line = checked.lines.where(("stages", i))
            raise DiffstageError(f"{file}:{line}: stages[{i}] {type(stage).__name__}: {e}") from None


@dataclass
class BuildPlan:
    """What a build decided before any weight loads."""

    run: RunConfig
    checked: CheckedModel
    defaults: dict[str, Any]  # sampling defaults: the model YAML's, then the run config's
    early: dict[int, PipelineStage]  # the stages that need no module, made already (by plan index)

    def request(self, **fields: Any) -> Req:
        """A request with these fields over the defaults, checked by the stages made so far (RequestError)."""
        return checked_request(self.defaults, self.checked.req_cls, list(self.early.values()), fields)

    def load(self, session: Session, planned_images: int | None = 1) -> Pipeline:
        """Load the modules (through `session`), make the remaining stages, and return the Pipeline. Once per
        plan: the stages made before weights load go into this pipeline (a second load would share them)."""
        run, checked, spec = self.run, self.checked, self.checked.spec
        model_path = self.model_path()
        step_cache = make_step_cache(run.cache, spec.step_cache)  # settings checked before weights load
        dtype = parse_dtype(run.runtime.get("dtype", "float32"))
        device = parse_device(run.runtime.get("device", "cpu"))
        state = init_parallel(run.parallel, device)  # before any weight loads: the layout is checked here
        check_before_load(checked, model_path, checked.allowlist, state)  # and the acceleration declarations
        for planned in checked.plan:  # a stage that builds the checkpoint's own pipeline: its class is checked first
            if planned.cls.takes_all_modules:
                loader.pipeline_class(model_path, checked.allowlist)
        settings = model_settings(checked, model_path)  # a wrong model_index.json value fails before weights load
        keys: dict[str, str] = {}
        execution = execution_options(run, spec, device, planned_images)
        quantize = quantize_targets(run.runtime, checked)  # names and backend checked before weights load
        check_quantize_backend(run.runtime.get("quantize", "none"), device)
        offload = offload_modules(run.runtime, device, checked)  # runtime.offload, refused here if it cannot
        modules = loader.load_modules(spec, model_path, dtype=dtype, device=device, allow_pickle=run.allow_pickle,
                                      allowlist=checked.allowlist, keys=keys, cache=session.modules,
                                      execution=execution, quantize=quantize, offload=offload)
        declared = apply_acceleration(checked, modules, execution)
        stages = [self.early.get(p.index) or instantiate_stage(p, checked, modules, model_path, settings)
                  for p in checked.plan]
        if spec.pipeline_config.checkpoint_settings:  # the stages made early saw only the YAML's defaults
            for stage in self.early.values():
                stage.settings = Settings(settings)
        attach_step_cache(stages, step_cache, checked, declared)
        attach_decode_options(stages, run.runtime, spec.name)
        route_attention(stages, execution["attention"])
        # the run config's adapters are read and checked against the modules now, before the first run
        lora = LoraAdapters(modules, run.allow_pickle, run.plain.get("lora"), release=session.modules.forget,
                            unfusable=offload and f"runtime.offload={offload.mode} reloads weights from the checkpoint")
        return Pipeline(spec, stages, modules, defaults=self.defaults, source=str(checked.file),
                        config={"run": run.plain, "model": checked.data}, checkpoint=str(model_path), device=device,
                        req_cls=checked.req_cls, reuse=session.reuse if run.reuse_enabled else None,
                        reuse_max_bytes=run.reuse_max_bytes,
                        module_keys={id(module): keys[name] for name, module in modules.items()},
                        hooks=[*offload_hooks(offload, stages), lora])

    def model_path(self) -> str | Path:
        """The checkpoint: the run config's model_path, else the model YAML's."""
        spec = self.checked.spec
        model_path = self.run.model_path or spec.model_path
        if not model_path:
            hint = f" (the YAML suggests: {', '.join(spec.hf_model_paths)})" if spec.hf_model_paths else ""
            raise DiffstageError(f"model '{spec.name}' needs model_path=DIR_OR_REPO_ID{hint}")
        return model_path


def plan_build(run: RunConfig, checked: CheckedModel) -> BuildPlan:
    """The run config's sampling keys checked against the model's request fields, the sampling defaults
    merged, and the stages that need no weights made (they can check a request before any weight loads)."""
    spec = checked.spec
    check_sampling_keys(run.sampling, checked.req_cls, str(checked.file))
    defaults = {**spec.sampling.model_dump(), **{f.name: f.default for f in spec.field_specs()}}
    defaults.update({k: v for k, v in run.sampling.items() if v is not None})
    defaults["loras"] = run.plain.get("lora") or None  # a request's adapters unless it names its own
    early = {p.index: instantiate_stage(p, checked, {}) for p in checked.plan
             if not p.contract.modules and not p.cls.takes_all_modules}
    return BuildPlan(run, checked, defaults, early)
