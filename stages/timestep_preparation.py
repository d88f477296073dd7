"""TimestepPreparationStage: set the scheduler's timesteps (with the model's sigma schedule and shift), and with
a strength keep only the schedule's last part (image-to-image: the run starts from a noised input image)."""
from __future__ import annotations

import math

from diffstage.errors import RequestError, shown
from diffstage.req import Req
from diffstage.stage import CallbackSpec, Contract, PipelineStage


class TimestepPreparationStage(PipelineStage):
    """Sets the scheduler's timesteps for the request's steps.

    Args:
        strength_field: a request field with a strength in [0, 1] (declare it in the YAML's request_fields):
            only the last int(steps * strength) steps run, as Diffusers' get_timesteps keeps them (the
            scheduler's begin index set to the first one kept); ImageNoisingStage then noises the input
            image's latents to the first timestep kept. num_inference_steps becomes the steps that run.
    """

    reads = ("num_inference_steps", "latents")
    writes = ("timesteps", "num_inference_steps")  # steps: the schedule's real length
    optional_writes = ("sigmas",)
    module_params = ("scheduler",)
    callback_specs = (
        CallbackSpec("sigmas", ("req", "settings", "scheduler"),
                     doc="returns a custom sigma schedule, or None for the scheduler's own (default: None)"),
        CallbackSpec("mu", ("req", "settings", "scheduler"),
                     doc="returns the resolution-dependent shift mu, or None (default: None)"),
    )

    def __init__(self, scheduler, strength_field: str | None = None):
        super().__init__()
        self.scheduler = scheduler
        self.strength_field = strength_field

    @classmethod
    def contract(cls, args) -> Contract:
        base = super().contract(args)
        strength = args.get("strength_field")
        if strength is not None and (not isinstance(strength, str) or not strength.isidentifier()):
            raise ValueError(f"strength_field must name a request field (such as `strength`), got {shown(strength)}")
        return Contract(reads=base.reads | ({strength} if strength else set()), writes=base.writes,
                        optional_reads=base.optional_reads, optional_writes=base.optional_writes,
                        callbacks=base.callbacks, modules=base.modules)

    def required_reads(self) -> tuple[str, ...]:
        return tuple(self.reads) + ((self.strength_field,) if self.strength_field else ())

    @staticmethod
    def default_sigmas(req, settings, scheduler):
        return None

    @staticmethod
    def default_mu(req, settings, scheduler):
        return None

    def request_problems(self, req: Req) -> list[str]:
        if not self.strength_field:
            return []
        strength, steps = getattr(req, self.strength_field), req.num_inference_steps
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
                or not 0 <= strength <= 1:
            return [f"{self.strength_field} must be a number in [0, 1], got {shown(strength)}"]
        if isinstance(steps, int) and steps > 0 and int(steps * strength) < 1:
            return [f"{self.strength_field}={strength:g} with num_inference_steps={steps} leaves no step to run "
                    f"(int(steps * {self.strength_field}) = 0): raise either of them"]
        return []

    def forward(self, req: Req) -> Req:
        if self.strength_field:
            problems = self.request_problems(req)
            if problems:
                raise RequestError(problems[0])
        sigmas = self.callback("sigmas")(req, self.settings, self.scheduler)
        mu = self.callback("mu")(req, self.settings, self.scheduler)
        kwargs = {"device": req.latents.device}
        if mu is not None:
            kwargs["mu"] = mu
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, **kwargs)
        else:
            self.scheduler.set_timesteps(req.num_inference_steps, **kwargs)
        req.timesteps = self.scheduler.timesteps
        if self.strength_field:  # a custom schedule's length counts its steps, as in Diffusers' retrieve_timesteps
            steps = len(req.timesteps) if sigmas is not None else req.num_inference_steps
            req.timesteps = self.truncated(steps, getattr(req, self.strength_field))
        sigmas = getattr(self.scheduler, "sigmas", None)
        skipped = len(self.scheduler.timesteps) - len(req.timesteps)  # by the strength: sigmas[i] is step i's
        req.sigmas = sigmas[skipped:] if sigmas is not None and skipped else sigmas
        req.num_inference_steps = len(req.timesteps)
        return req

    def truncated(self, steps: int, strength: float):
        """The last int(steps * strength) steps of the scheduler's timesteps, as Diffusers' get_timesteps."""
        t_start = max(steps - min(int(steps * strength), steps), 0)
        order = getattr(self.scheduler, "order", 1)
        if hasattr(self.scheduler, "set_begin_index"):  # index-based schedulers (Euler, DPM) start there
            self.scheduler.set_begin_index(t_start * order)
        return self.scheduler.timesteps[t_start * order:]
