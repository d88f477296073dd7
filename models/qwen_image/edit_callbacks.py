"""Qwen-Image-Edit callbacks for the standard stages (math follows Diffusers' QwenImageEditPipeline).

Qwen-Image-Edit is Qwen-Image conditioned on an input image twice: Qwen2.5-VL sees it with the
instruction (as vision tokens inside the chat template), and its VAE latents, at about one
megapixel whatever the output size, are appended to the sequence of noisy latents. The output
size follows the input image's aspect ratio unless the request sets it. Text combining,
latents, decoding and the norm-preserving CFG are Qwen-Image's (`callbacks.py`)."""
from __future__ import annotations

import math

import torch

from diffstage.callbacks import reads
from diffstage.images import open_image

from .callbacks import prompt_tokens


def edit_size(image, settings) -> tuple[int, int]:
    """(height, width) of `settings.target_area` pixels in the image's aspect ratio, in multiples of 32."""
    ratio = image.width / image.height
    width = math.sqrt(settings.target_area * ratio)
    height = width / ratio
    return round(height / 32) * 32, round(width / 32) * 32  # Python's round, as Diffusers rounds


# --- input_validation ---------------------------------------------------------
@reads("image")
def output_size(req, settings):
    """Unset height/width follow the input image."""
    return edit_size(open_image(req.image), settings)


# --- image_encoding -----------------------------------------------------------
@reads()
def image_size(image, req, settings):
    """The VAE and the text encoder see the image at the target area, whatever the output size."""
    return edit_size(image, settings)


def normalize(latents, settings, vae):
    """Per-channel (latents - mean) / std of the Qwen-Image VAE ([B, C, 1, H, W])."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return (latents - mean) / std


@reads()
def pack_image(latents, req, settings):
    """[B, C, 1, H, W] -> [B, (H/2)*(W/2), C*4], the layout of the noisy latents."""
    b, c, _, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


# --- denoising ----------------------------------------------------------------
@reads("raw_latent_shape", "image_latent_shape")
def model_inputs(req, settings, transformer, negative):
    prefix = "negative_" if negative else ""
    _, _, _, h, w = req.raw_latent_shape
    _, _, _, ih, iw = req.image_latent_shape
    return {"encoder_hidden_states": getattr(req, f"{prefix}prompt_embeds"),
            "encoder_hidden_states_mask": getattr(req, f"{prefix}prompt_embeds_mask"),
            # the noisy latents' grid, then the input image's; one entry per prompt, as Diffusers passes it
            "img_shapes": [[(1, h // 2, w // 2), (1, ih // 2, iw // 2)]] * len(req.prompts()),
            "guidance": None}


@reads("image_latents")
def latent_input(latents, req, settings):
    """The input image's tokens follow the noisy ones in the sequence."""
    return torch.cat([latents, req.image_latents], dim=1)


@reads("latents")
def drop_image_tokens(pred, req, settings):
    """The prediction for the noisy tokens only (CFG's combine is per token, so before or after it is the same)."""
    return pred[:, :req.latents.shape[1]]


# --- text_encoding ------------------------------------------------------------
@reads()  # nothing from the request: the encoder outputs only
def combine(outputs, req, settings, negative):
    """The prompt tokens and their mask, not cut to max_sequence_length: the image's vision tokens are among
    them, and Diffusers keeps them all."""
    embeds, keep = prompt_tokens(outputs, settings)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": keep}
