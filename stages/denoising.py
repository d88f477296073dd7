"""DenoisingStage: the sampling loop, with classifier-free guidance and per-step hooks."""
from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from diffstage.errors import RequestError
from diffstage.req import Req
from diffstage.stage import CallbackSpec, Contract, PipelineStage

# Signature of a step hook: hook(stage, req, step_index, t, noise_pred) -> noise_pred | None.
# Hooks run after the model call and before the scheduler step; step caches plug in here.
StepHook = Callable[..., "torch.Tensor | None"]


class DenoisingStage(PipelineStage):
    """Runs the transformer over the schedule.

    Args:
        conditioning: Req fields the model is conditioned on; with CFG their
            `negative_` counterparts are used for the unconditional branch.
        latents_arg / timestep_arg: the transformer's keyword names for the
            noisy latents and the timestep.
        progress: show a tqdm progress bar.
    """

    reads = ("latents", "timesteps", "do_cfg", "cfg_scale")
    writes = ("latents",)
    module_params = ("transformer", "scheduler")
    callback_specs = (
        CallbackSpec("model_inputs", ("req", "settings", "transformer", "negative"), required=True,
                     doc="returns the transformer's conditioning kwargs for one branch (fixed over steps)"),
        CallbackSpec("timestep_input", ("t", "req", "settings"),
                     doc="returns the timestep tensor the transformer takes (default: t for each batch item)"),
        CallbackSpec("combine_cfg", ("cond", "uncond", "scale"),
                     doc="combines the two predictions (default: uncond + scale * (cond - uncond))"),
    )

    def __init__(self, transformer, scheduler, conditioning: tuple[str, ...] = ("prompt_embeds",),
                 latents_arg: str = "hidden_states", timestep_arg: str = "timestep", progress: bool = True):
        super().__init__()
        self.transformer = transformer
        self.scheduler = scheduler
        self.conditioning = list(conditioning)
        self.latents_arg = latents_arg
        self.timestep_arg = timestep_arg
        self.progress = progress
        self.step_hooks: list[StepHook] = []

    @classmethod
    def contract(cls, args) -> Contract:
        base = super().contract(args)
        cond = list(args.get("conditioning", ["prompt_embeds"]))
        negatives = [f"negative_{c}" for c in cond]
        return Contract(reads=base.reads | frozenset(cond), writes=base.writes,
                        optional_reads=frozenset(negatives), callbacks=base.callbacks, modules=base.modules)

    def required_reads(self) -> tuple[str, ...]:
        return tuple(self.reads) + tuple(self.conditioning)

    @staticmethod
    def default_timestep_input(t, req, settings):
        return t.expand(req.latents.shape[0]).to(req.latents.dtype)

    @staticmethod
    def default_combine_cfg(cond, uncond, scale):
        return uncond + scale * (cond - uncond)

    def add_step_hook(self, hook: StepHook) -> None:
        self.step_hooks.append(hook)

    def predict(self, latents, timestep, inputs: dict) -> torch.Tensor:
        kwargs = {self.latents_arg: latents, self.timestep_arg: timestep, **inputs}
        return self.transformer(**kwargs, return_dict=False)[0]

    @torch.no_grad()
    def forward(self, req: Req) -> Req:
        model_inputs = self.callback("model_inputs")
        cond_inputs = model_inputs(req, self.settings, self.transformer, False)
        uncond_inputs = model_inputs(req, self.settings, self.transformer, True) if req.do_cfg else None
        timestep_input = self.callback("timestep_input")
        combine = self.callback("combine_cfg")
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        latents = req.latents
        # disable=None: no bar when stderr is not a terminal (logs, CI, subprocesses)
        bar = tqdm(req.timesteps, disable=None if self.progress else True, desc="denoising", leave=False)
        for i, t in enumerate(bar):
            req.latents = latents
            timestep = timestep_input(t, req, self.settings)
            noise_pred = self.predict(latents, timestep, cond_inputs)
            if uncond_inputs is not None:
                uncond = self.predict(latents, timestep, uncond_inputs)
                noise_pred = combine(noise_pred, uncond, req.cfg_scale)
            for hook in self.step_hooks:
                out = hook(self, req, i, t, noise_pred)
                if out is not None:
                    noise_pred = out
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if not bool(torch.isfinite(latents).all()):  # one reduction a step; NaN never recovers
                raise RequestError(f"{type(self).__name__}: the latents became NaN or infinite at step {i + 1} of "
                                   f"{len(req.timesteps)} (timestep {float(t):g}); the model diverged: try a lower "
                                   "guidance scale, float32 (runtime.dtype), or another seed")
        req.latents = latents
        return req
