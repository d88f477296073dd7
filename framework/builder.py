"""The builder: Hydra config -> model spec -> static check -> modules -> stages -> Pipeline.

    build_pipeline("my_model", model_path="/ckpt/my_model", overrides=["runtime.dtype=bfloat16"])

Everything that can be checked without weights is checked first, and every
problem is reported at once."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from . import loader
from .attention import get_backend
from .attention.layer import DEFAULT_BACKEND
from .check import PlannedStage, check_contracts
from .distributed import init_parallel
from .errors import DiffstageError, RequestError, SpecError, clipped, shown
from .kernels import resolve_kernels
from .models_dir import model_yaml
from .overrides import prepare_overrides
from .pipeline import Pipeline, make_request, request_problems
from .req import FieldSpec, Req
from .resolve import DEFAULT_ALLOWLIST, callback_allowlist, given_object, resolve
from .reuse import DEFAULT_MAX_BYTES
from .session import Session, default_session
from .step_cache import StepCache, make_step_cache
from .run_config import check_sampling_keys, plain_run_config
from .spec import ModelSpec, validate_spec
from .stage import PipelineStage
from .torch_utils import parse_device, parse_dtype
from .model_yaml import load_model_yaml
from .yaml_lines import LineMap

CONFIG_MODULE = "diffstage.conf"


@dataclass
class CheckedModel:
    """A model YAML that passed the schema and contract checks (nothing loaded yet)."""

    file: Path
    data: dict
    spec: ModelSpec
    plan: list[PlannedStage]
    allowlist: tuple[str, ...]
    lines: LineMap
    req_cls: type[Req] = Req  # the standard Req fields plus those the YAML and its stages declare


def _known_stages() -> list[type[PipelineStage]]:
    from diffstage.stages import STANDARD_STAGES

    return list(STANDARD_STAGES)


def check_model(name_or_path: str | Path, allowlist: Iterable[str] = ()) -> CheckedModel:
    """Validate a model YAML (schema + stage contracts) without loading any weights.

    Raises SpecError listing every problem found, each with file, key path and line."""
    allowlist = [allowlist] if isinstance(allowlist, str) else list(allowlist)  # "os" is one prefix, not o, s
    if not all(isinstance(p, str) and p for p in allowlist):
        raise DiffstageError(f"allowlist must be a list of module prefixes (strings), got {shown(allowlist)}")
    file = model_yaml(str(name_or_path))
    data, lines = load_model_yaml(file)
    return check_data(data, file, lines, allowlist)


def check_data(data: Any, file: str | Path, lines: LineMap, allowlist: Iterable[str] = ()) -> CheckedModel:
    """The checks of check_model on model data already read (`lines` says where each key came from)."""
    allow = tuple(DEFAULT_ALLOWLIST) + tuple(allowlist)
    spec, problems = validate_spec(data, str(file), lines)
    problems = lines.problems + problems
    plan: list[PlannedStage] = []
    declared: dict[str, str] = {}
    if isinstance(data, dict):
        plan, contract_problems, declared = check_contracts(data, str(file), lines, allow, _known_stages())
        problems += contract_problems
    if problems:
        problems.sort(key=lambda p: (p.file != str(file), p.file or "", p.line or 0, p.key))
        raise SpecError(problems)
    assert spec is not None
    fields = spec.field_specs() + [FieldSpec(name, "state", doc) for name, doc in declared.items()]
    return CheckedModel(Path(file), data, spec, plan, allow, lines, Req.with_fields(fields))


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides (outside a Hydra app)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if not all(isinstance(o, str) for o in overrides):
        raise DiffstageError(f"overrides must be a list of strings such as ['seed=3'], got {shown(overrides)}")
    overrides = prepare_overrides(overrides)  # a model's request fields without `+`; typos with a did-you-mean
    try:
        if GlobalHydra.instance().is_initialized():
            return compose("config", overrides=list(overrides))
        with initialize_config_module(CONFIG_MODULE, version_base=None):
            return compose("config", overrides=list(overrides))
    except (HydraException, ValueError, TypeError) as e:  # Hydra raises all three for overrides it cannot use
        raise DiffstageError(f"bad config override: {clipped(str(e).strip(), 600)}") from None


def _substitute(value: Any, path: tuple, obj: Any) -> Any:
    """Return a copy of `value` with the item at `path` replaced by `obj`."""
    if not path:
        return obj
    value = copy.copy(value)
    value[path[0]] = _substitute(value[path[0]], path[1:], obj)
    return value


def instantiate_stage(planned: PlannedStage, checked: CheckedModel, modules: dict[str, Any],
                      model_path: str | Path | None = None) -> PipelineStage:
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
    stage.declared = planned.contract
    pc = checked.spec.pipeline_config
    group = pc.callbacks.get(planned.cls.callback_group(), {})
    callbacks = callback_allowlist(checked.allowlist)  # not diffusers./transformers./torch. functions
    stage.bind({name: resolve(path, callbacks) for name, path in group.items()}, pc.settings, sources=group)
    return stage


def execution_options(cfg: dict, spec: ModelSpec, device: torch.device, planned_images: int | None = 1) -> dict[str, Any]:
    """How native modules run: attention backend (command line, else model YAML, else sdpa),
    kernels, regional compilation and matmul dtype; checked here so a typo fails before weights load.
    `auto` compile and matmul dtype are decided per model when it loads (NativeModel.resolve_runtime);
    `planned_images` (how many images this run will make; None: unknown) informs the compile choice."""
    runtime = cfg.get("runtime") or {}
    backend = (cfg.get("attention") or {}).get("backend") or spec.attention or DEFAULT_BACKEND
    get_backend(backend)
    kernels = str(runtime.get("kernels") or "auto")
    resolve_kernels(kernels, device)
    matmul_dtype = runtime.get("matmul_dtype")
    if matmul_dtype not in (None, "auto"):
        parse_dtype(matmul_dtype)
    return {"attention": backend, "kernels": kernels, "compile": runtime.get("compile", False),
            "matmul_dtype": matmul_dtype, "planned_images": planned_images}


def build_from_config(cfg: DictConfig | dict, request: dict[str, Any] | None = None,
                      checked: CheckedModel | None = None, planned_images: int | None = 1,
                      session: Session | None = None) -> Pipeline:
    """Build a Pipeline from a composed run config (see conf/config.yaml).

    With `request` (the arguments the pipeline will be called with), stages that need
    no weights check it first, so a request out of range fails before anything loads.
    `checked` passes a check_model() result for cfg.model the caller already has.
    `planned_images`: how many images the caller will make (None: unknown), for
    `runtime.compile=auto`. `session` owns the module and reuse caches (default: the process's)."""
    session = session if session is not None else default_session()
    plain = plain_run_config(cfg)
    checked = checked or check_model(plain["model"], allowlist=plain.get("allowlist") or ())
    spec = checked.spec
    check_sampling_keys(plain, checked.req_cls, str(checked.file))
    defaults = {**spec.sampling.model_dump(), **{f.name: f.default for f in spec.field_specs()}}
    overrides = plain.get("sampling") or {}
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    early = {p.index: instantiate_stage(p, checked, {}) for p in checked.plan
             if not p.contract.modules and not p.cls.takes_all_modules}
    if request is not None:
        req = make_request(defaults, req_cls=checked.req_cls, **request)
        problems = request_problems(req, list(early.values()))
        if problems:
            raise RequestError("invalid request:\n" + "\n".join(f"  - {m}" for m in problems))
    model_path = plain.get("model_path") or spec.model_path
    if not model_path:
        hint = f" (the YAML suggests: {', '.join(spec.hf_model_paths)})" if spec.hf_model_paths else ""
        raise DiffstageError(f"model '{spec.name}' needs model_path=DIR_OR_REPO_ID{hint}")
    step_cache = make_step_cache(plain.get("cache"), spec.step_cache)  # settings checked before weights load
    runtime = plain.get("runtime") or {}
    dtype = parse_dtype(runtime.get("dtype", "float32"))
    device = parse_device(runtime.get("device", "cpu"))
    init_parallel(plain.get("parallel") or {}, device)  # before any weight loads: the layout is checked here
    for planned in checked.plan:  # a stage that builds the checkpoint's own pipeline: its class is checked first
        if planned.cls.takes_all_modules:
            loader.pipeline_class(model_path, checked.allowlist)
    keys: dict[str, str] = {}
    modules = loader.load_modules(spec, model_path, dtype=dtype, device=device,
                                  allow_pickle=plain.get("allow_pickle", False),
                                  allowlist=checked.allowlist, execution=execution_options(plain, spec, device, planned_images),
                                  keys=keys, cache=session.modules)
    stages = [early.get(p.index) or instantiate_stage(p, checked, modules, model_path) for p in checked.plan]
    attach_step_cache(stages, step_cache, checked)
    run_config = {k: v for k, v in plain.items() if k != "hydra"}
    pipeline = Pipeline(spec, stages, modules, defaults=defaults, source=str(checked.file),
                        config={"run": run_config, "model": checked.data}, checkpoint=str(model_path), device=device,
                        req_cls=checked.req_cls)
    pipeline.module_keys = {id(module): keys[name] for name, module in modules.items()}
    reuse = plain.get("reuse") or {}
    pipeline.reuse = session.reuse if reuse.get("enabled", True) else None
    pipeline.reuse_max_bytes = int(reuse.get("max_mb", DEFAULT_MAX_BYTES // 2 ** 20) * 2 ** 20)
    return pipeline


def attach_step_cache(stages: list, cache: StepCache | None, checked: CheckedModel) -> None:
    """Give the step cache to the stages that take one (each DenoisingStage gets its own copy)."""
    if cache is None:
        return
    takers = [(i, s) for i, s in enumerate(stages) if hasattr(s, "set_step_cache")]
    if not takers:
        raise DiffstageError(f"cache={cache.kind}: model '{checked.spec.name}' has no stage that takes a step cache "
                             "(DenoisingStage does); use cache=none")
    for i, stage in takers:
        try:
            stage.set_step_cache(copy.deepcopy(cache))
        except ValueError as e:
            file, line = checked.lines.where(("stages", i))
            raise DiffstageError(f"{file}:{line}: stages[{i}] {type(stage).__name__}: {e}") from None


def build_pipeline(model: str | Path | None = None, *, model_path: str | Path | None = None,
                   overrides: Sequence[str] = (), session: Session | None = None) -> Pipeline:
    """Build a pipeline from a model name (or YAML path) and Hydra-style overrides.

        pipe = build_pipeline("my_model", model_path="ckpt/", overrides=["sampling.height=512"])
        image = pipe(prompt="a red fox", seed=0).images[0]

    `session`: where loaded modules and reused outputs are kept (default: the process's, see session.py).
    """
    args = list(overrides)
    if model is not None:
        args.append(f"model={model}")
    if model_path is not None:
        args.append(f"model_path={model_path}")
    return build_from_config(compose_config(args), session=session)
