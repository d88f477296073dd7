"""ImageNoisingStage: start the run from an input image's latents noised to the schedule's first timestep
(image-to-image and inpainting with a strength), instead of from pure noise."""
from __future__ import annotations

import torch

from diffstage.errors import StageError
from diffstage.req import Req
from diffstage.stage import Contract, PipelineStage

NOISED = "latents_noised"


class ImageNoisingStage(PipelineStage):
    """latents = scheduler.add_noise(image latents, noise, first timestep), as Diffusers' image-to-image and
    inpainting pipelines start; the noise is the latents LatentPreparationStage drew, the first timestep that
    of the schedule TimestepPreparationStage set (its `strength_field` truncates it). Schedulers without
    add_noise (flow matching) use scale_noise(image latents, timestep, noise). DenoisingStage then does not
    scale the latents by init_noise_sigma (`latents_noised` tells it).

    Where the image's latents are unset (ImageEncodingStage with `strength_field` skips them at full strength),
    the latents stay the noise, which DenoisingStage scales by init_noise_sigma: Diffusers' inpainting at
    strength 1.

    Args:
        image_field: the state field with the input image's latents, in the latents' layout (default
            `image_latents`, ImageEncodingStage's `field`).
    """

    reads = ("latents", "timesteps")
    writes = ("latents", NOISED)
    module_params = ("scheduler",)

    def __init__(self, scheduler, image_field: str = "image_latents"):
        super().__init__()
        self.scheduler = scheduler
        self.image_field = image_field

    @classmethod
    def contract(cls, args) -> Contract:
        base = super().contract(args)
        return Contract(reads=base.reads, writes=base.writes, optional_reads=frozenset({args.get("image_field",
                                                                                                 "image_latents")}),
                        callbacks=base.callbacks, modules=base.modules, declares=base.declares)

    @torch.no_grad()
    def forward(self, req: Req) -> Req:
        image, noise = getattr(req, self.image_field), req.latents
        if image is None:  # a full-strength run: pure noise
            setattr(req, NOISED, False)
            return req
        if tuple(image.shape) != tuple(noise.shape):
            raise StageError(f"ImageNoisingStage: the image latents ('{self.image_field}') have shape "
                             f"{list(image.shape)}, the noise {list(noise.shape)}; they must match (the same "
                             "latent layout, one copy per batch item)")
        first = req.timesteps[:1].repeat(noise.shape[0])
        image = image.to(device=noise.device, dtype=noise.dtype)
        if hasattr(self.scheduler, "add_noise"):
            req.latents = self.scheduler.add_noise(image, noise, first)
        elif hasattr(self.scheduler, "scale_noise"):
            req.latents = self.scheduler.scale_noise(image, first, noise)
        else:
            raise StageError(f"ImageNoisingStage: {type(self.scheduler).__name__} has neither add_noise nor "
                             "scale_noise, so an image cannot be noised to a timestep")
        setattr(req, NOISED, True)
        return req
