"""LatentPreparationStage: draw the initial noise and put it in the model's latent layout."""
from __future__ import annotations

import torch

from diffstage.req import Req
from diffstage.stage import CallbackSpec, PipelineStage
from diffstage.torch_utils import module_device, module_dtype


class LatentPreparationStage(PipelineStage):
    """Draws noise of `latent_shape` from the request's CPU generator (as Diffusers'
    randn_tensor does), then lets the model pack it and compute position ids."""

    reads = ("batch_size", "height", "width", "generator")
    optional_reads = ("input_latents",)
    writes = ("latents", "raw_latent_shape")
    optional_writes = ("image_position_ids",)  # None for models without position ids
    module_params = ("transformer", "vae")
    callback_specs = (
        CallbackSpec("latent_shape", ("req", "settings", "transformer", "vae"), required=True,
                     doc="returns the unpacked latent shape (channels, height, width) for one image"),
        CallbackSpec("pack", ("latents", "req", "settings"),
                     doc="returns latents in the transformer's input layout (default: unchanged)"),
        CallbackSpec("position_ids", ("req", "settings"),
                     doc="returns position ids of the latent tokens, or None (default: None)"),
    )

    def __init__(self, transformer, vae):
        super().__init__()
        self.transformer = transformer
        self.vae = vae

    @staticmethod
    def default_pack(latents, req, settings):
        return latents

    @staticmethod
    def default_position_ids(req, settings):
        return None

    def forward(self, req: Req) -> Req:
        c, h, w = self.callback("latent_shape")(req, self.settings, self.transformer, self.vae)
        shape = (req.batch_size, c, h, w)
        device, dtype = module_device(self.transformer), module_dtype(self.transformer)
        req.raw_latent_shape = shape
        if req.input_latents is not None:
            req.latents = req.input_latents.to(device=device, dtype=dtype)
        else:
            noise = torch.randn(shape, generator=req.generator, device=req.generator.device, dtype=dtype)
            req.latents = self.callback("pack")(noise.to(device), req, self.settings)
        req.image_position_ids = self.callback("position_ids")(req, self.settings)
        return req
