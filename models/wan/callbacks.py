"""Wan2.1 text-to-video callbacks for the standard stages (math follows Diffusers' WanPipeline).

Wan encodes the prompt with UMT5 under its attention mask and zeroes the padded positions;
its latents are 5-D video latents [B, C, F, H, W] (the VAE compresses 4 frames into one,
after the first); the VAE normalises each latent channel by a mean and a standard deviation."""
from __future__ import annotations

import torch

from diffstage.callbacks import reads


# --- text_encoding ------------------------------------------------------------
@reads()  # nothing from the request: the encoder outputs only
def combine(outputs, req, settings, negative):
    """UMT5's states with the padding positions set to zero, as Wan's transformer was trained on."""
    embeds, mask = outputs["t5_embeds"], outputs["text_mask"]
    return {"prompt_embeds": embeds * mask[..., None].to(embeds.dtype)}


# --- latent_preparation -------------------------------------------------------
@reads("height", "width", "num_frames")
def latent_shape(req, settings, transformer, vae):
    """(channels, latent frames, height, width) of one video; frames become (num_frames - 1) // 4 + 1."""
    frames = (req.num_frames - 1) // vae.config.scale_factor_temporal + 1
    scale = vae.config.scale_factor_spatial
    return transformer.config.in_channels, frames, req.height // scale, req.width // scale


# --- denoising ----------------------------------------------------------------
def model_inputs(req, settings, transformer, negative):
    return {"encoder_hidden_states": getattr(req, "negative_prompt_embeds" if negative else "prompt_embeds")}


# --- decoding -----------------------------------------------------------------
def denormalize(latents, settings, vae):
    """Per-channel mean and standard deviation of the Wan VAE (computed as Diffusers does, for exact parity)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / inv_std + mean
