"""The builder: Hydra config -> run config -> model check -> build plan -> modules -> Pipeline.

    build_pipeline("my_model", model_path="/ckpt/my_model", overrides=["runtime.dtype=bfloat16"])

Everything that can be checked without weights is checked first, and every problem is reported at
once. The steps live in their own modules: run_config (the run config, typed), model_check (the model
YAML), build_plan (from both to a Pipeline); this module composes them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .build_plan import BuildPlan, attach_step_cache, execution_options, instantiate_stage, plan_build
from .errors import DiffstageError, clipped, shown
from .model_check import CheckedModel, check_data, check_model
from .overrides import prepare_overrides
from .pipeline import Pipeline
from .run_config import RunConfig, parse_run_config
from .session import Session, default_session

CONFIG_MODULE = "diffstage.conf"

__all__ = ["BuildPlan", "CheckedModel", "attach_step_cache", "build_from_config", "build_pipeline", "check_data",
           "check_model", "compose_config", "execution_options", "instantiate_stage", "plan_build", "plan_from_config"]


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


def plan_from_config(cfg: DictConfig | dict | RunConfig, checked: CheckedModel | None = None) -> BuildPlan:
    """The build plan of a run config (parsed here unless it is a RunConfig already); `checked` passes a
    check_model() result for its model the caller already has."""
    run = parse_run_config(cfg)
    return plan_build(run, checked or check_model(run.model, allowlist=run.allowlist))


def build_from_config(cfg: DictConfig | dict | RunConfig, request: dict[str, Any] | None = None,
                      checked: CheckedModel | None = None, planned_images: int | None = 1,
                      session: Session | None = None) -> Pipeline:
    """Build a Pipeline from a composed run config (see conf/config.yaml), or a RunConfig.

    With `request` (the arguments the pipeline will be called with), stages that need
    no weights check it first, so a request out of range fails before anything loads.
    `checked` passes a check_model() result for cfg.model the caller already has.
    `planned_images`: how many images the caller will make (None: unknown), for
    `runtime.compile=auto`. `session` owns the module and reuse caches (default: the process's)."""
    plan = plan_from_config(cfg, checked)
    if request is not None:
        plan.request(**request)
    return plan.load(session if session is not None else default_session(), planned_images)


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
