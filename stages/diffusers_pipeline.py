"""DiffusersPipelineStage: run a whole Diffusers pipeline as one stage (the fallback for checkpoints
that have no diffstage YAML). Its modules still load through diffstage's loader: allowlist,
safetensors only unless pickle is allowed, strict weights; the request is checked as usual."""
from __future__ import annotations

import inspect
from typing import Any

from diffstage.req import Req
from diffstage.stage import PipelineStage

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
            accepted = inspect.signature(self.pipe.__call__).parameters
            self.passed = [name for name in PASSED if name in accepted]  # the request fields its __call__ takes

    def forward(self, req: Req) -> Req:
        kwargs = {name: getattr(req, name) for name in self.passed if getattr(req, name) is not None}
        out = self.pipe(**self.call_kwargs, **kwargs)
        req.output = out.images if hasattr(out, "images") else out.frames
        return req
