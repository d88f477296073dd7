"""Stable Diffusion 1.5 image-to-image and inpainting callbacks (math follows Diffusers'
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline).

The work is the standard stages': ImageEncodingStage samples the input image's latents,
TimestepPreparationStage keeps the strength's share of the schedule, ImageNoisingStage noises the
image's latents to its first step, MaskPreparationStage makes the inpainting mask and the masked
image's latents. What is SD's own: image-to-image output follows the input image's size, and the
inpainting UNet takes the mask and the masked image's latents beside the latents, on the channels."""
from __future__ import annotations

import torch

from diffstage.callbacks import reads
from diffstage.errors import RequestError
from diffstage.images import open_image


# --- input_validation ---------------------------------------------------------
@reads("image")
def output_size(req, settings):
    """Unset height/width follow the input image, rounded down to settings.size_multiple (the VAE's scale)."""
    if req.image is None:
        raise RequestError("image is not set: image-to-image needs an input image (its size is the output's unless "
                           "height and width are given)")
    image = open_image(req.image)
    multiple = settings.size_multiple
    return image.height - image.height % multiple, image.width - image.width % multiple


# --- denoising ----------------------------------------------------------------
@reads("mask", "masked_image_latents")
def latent_input(latents, req, settings):
    """The 9-channel inpainting UNet's input: latents, mask, masked image's latents, joined on the channels."""
    return torch.cat([latents, req.mask, req.masked_image_latents], dim=1)


# --- image_encoding -----------------------------------------------------------
@reads()
def contiguous(latents, req, settings):
    """The image's latents in plain memory layout. Diffusers' inpainting repeats them per batch item (a
    contiguous copy) where its image-to-image concatenates them (keeping the VAE's channels-last layout); the
    UNet's rounding follows the layout (~1e-6), so each pipeline here keeps its reference's."""
    return latents.contiguous()
