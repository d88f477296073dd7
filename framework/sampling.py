"""Facts about the steps of a sampling loop: whether latents are still finite, whether a scheduler's step draws
noise (which decides whether a batch can give each prompt its own seed)."""
from __future__ import annotations

import inspect

import torch

from .errors import RequestError


def check_finite_latents(latents: torch.Tensor, stage: str, step: int, steps: int, t) -> None:
    """Refuse latents with NaN or Inf at the step they appear (one reduction a step; NaN never recovers)."""
    if not bool(torch.isfinite(latents).all()):
        raise RequestError(f"{stage}: the latents became NaN or infinite at step {step} of {steps} (timestep "
                           f"{float(t):g}); the model diverged: try a lower guidance scale, float32 (runtime.dtype), "
                           "or another seed")


def step_draws_noise(scheduler, settings) -> bool:
    """Whether the scheduler's step draws noise from the request's generator (one generator for the whole batch:
    then a batch of prompts with a seed each does not give each prompt what it gets alone). Steps that take a
    generator but use it only in a stochastic mode their config (or the stage's `eta`) turns on are exempt."""
    if "generator" not in inspect.signature(scheduler.step).parameters:
        return False
    config, name = getattr(scheduler, "config", {}), type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        return bool(config.get("stochastic_sampling", False))
    if name == "EulerDiscreteScheduler":
        return False  # noise only with s_churn > 0, which the default step_kwargs never passes
    if name == "DDIMScheduler":
        return settings.get("eta", 0.0) != 0
    if name.startswith("DPMSolver"):
        return "sde" in str(config.get("algorithm_type", ""))
    return True


def seed_list_problem(scheduler, settings) -> str | None:
    """Why a denoising loop with this scheduler cannot give each prompt of a batch its own seed (None: it can)."""
    if scheduler is not None and step_draws_noise(scheduler, settings):
        return (f"{type(scheduler).__name__} draws noise at every step from one generator, so the prompts of a "
                "batch cannot each have their own seed")
    return None
