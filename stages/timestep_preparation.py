"""TimestepPreparationStage: set the scheduler's timesteps (with the model's sigma schedule and shift)."""
from __future__ import annotations

from diffstage.req import Req
from diffstage.stage import CallbackSpec, PipelineStage


class TimestepPreparationStage(PipelineStage):
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

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler

    @staticmethod
    def default_sigmas(req, settings, scheduler):
        return None

    @staticmethod
    def default_mu(req, settings, scheduler):
        return None

    def forward(self, req: Req) -> Req:
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
        req.sigmas = getattr(self.scheduler, "sigmas", None)
        req.num_inference_steps = len(req.timesteps)
        return req
