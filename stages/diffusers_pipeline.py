"""DiffusersPipelineStage: run a whole Diffusers pipeline as one stage (the fallback for checkpoints
that have no diffstage YAML). Its modules still load through diffstage's loader: allowlist,
safetensors only unless pickle is allowed, strict weights; the request is checked as usual, and the
latents of every step and the decoded images get the native stages' NaN/Inf checks."""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from diffstage.req import Req
from diffstage.run_events import report_step
from diffstage.stage import PipelineStage
from diffstage.stages.decoding import check_finite_decoded, to_pil
from diffstage.sampling import check_finite_latents

# Request fields handed to the pipeline's __call__ when it takes them (and they are set).
PASSED = ("prompt", "prompt_2", "negative_prompt", "num_inference_steps", "height", "width", "guidance_scale",
          "true_cfg_scale", "max_sequence_length", "num_images_per_prompt", "generator", "output_type")


class DiffusersPipelineStage(PipelineStage):
    """Builds the checkpoint's own pipeline class from every loaded module and calls it with the request.

    Args:
        call_kwargs: extra keyword arguments for every call of the pipeline, from the YAML
            (e.g. {use_resolution_binning: false}).
        modules, pipeline_class: set by the builder: every module model_index.json lists, loaded,
            and the Diffusers pipeline class it names.
    """

    reads = ("prompt", "num_inference_steps", "height", "width", "generator")
    optional_reads = ("prompt_2", "negative_prompt", "guidance_scale", "true_cfg_scale", "max_sequence_length")
    writes = ("output",)
    takes_all_modules = True

    def __init__(self, call_kwargs: dict[str, Any] | None = None, progress: bool = False,
                 modules: dict[str, Any] | None = None, pipeline_class: type | None = None):
        super().__init__()
        self.call_kwargs = dict(call_kwargs or {})
        self.pipe = None
        if pipeline_class is not None:
            params = inspect.signature(pipeline_class.__init__).parameters
            given = modules or {}
            # components the checkpoint leaves out (a safety checker) are passed as None when required
            kwargs = {name: given.get(name) for name, p in params.items() if name != "self"
                      and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                      and (name in given or p.default is inspect.Parameter.empty)}
            self.pipe = pipeline_class(**kwargs)
            self.pipe.set_progress_bar_config(disable=None if progress else True)
            self.accepted = set(inspect.signature(self.pipe.__call__).parameters)
            self.passed = [name for name in PASSED if name in self.accepted]  # the request fields its __call__ takes

    def step_check(self, steps: int) -> dict[str, Any]:
        """The NaN/Inf check of the native denoising loop, as the step callback this pipeline's __call__ takes."""
        name = type(self).__name__

        def check(i, t, latents):
            if isinstance(latents, torch.Tensor):
                check_finite_latents(latents, name, i + 1, steps, t)

        def on_step_end(pipe, i, t, callback_kwargs):
            check(i, t, callback_kwargs.get("latents"))
            report_step(i + 1, steps, None, None)  # progress and cancellation (its latents' layout is the pipeline's)
            return callback_kwargs

        if "callback_on_step_end" in self.accepted:
            extra = {"callback_on_step_end": on_step_end}
        elif "callback" in self.accepted and "callback_steps" in self.accepted:  # the older form
            extra = {"callback": check, "callback_steps": 1}
        else:
            extra = {}
        return {k: v for k, v in extra.items() if k not in self.call_kwargs}

    def forward(self, req: Req) -> Req:
        kwargs = {name: getattr(req, name) for name in self.passed if getattr(req, name) is not None}
        wanted = kwargs.get("output_type", "pil")
        if wanted == "pil" and "output_type" in self.passed:
            kwargs["output_type"] = "np"  # PIL conversion turns NaN into black: check the array, then convert
        kwargs.update(self.step_check(req.num_inference_steps))
        out = self.pipe(**self.call_kwargs, **kwargs)
        output = out.images if hasattr(out, "images") else out.frames
        arrays = isinstance(output, (np.ndarray, torch.Tensor))
        if wanted != "latent" and arrays:
            check_finite_decoded(output, type(self).__name__)  # the check of the native DecodingStage
        if kwargs.get("output_type", wanted) != wanted and arrays:  # as Diffusers converts: [B, H, W, C], videos 5-D
            output = to_pil(output) if output.ndim == 4 else [to_pil(frames) for frames in output]
        req.output = output
        return req
