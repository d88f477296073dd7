"""Stable Diffusion 3 callbacks for the standard stages (math follows Diffusers' StableDiffusion3Pipeline).

SD3 encodes the prompt three times: two CLIP encoders give their penultimate hidden
states (joined along the width, padded to T5's) and their pooled projections (joined),
and T5 gives a token sequence appended after the CLIP tokens. Latents are plain 4-D
VAE latents (the transformer patchifies them itself); guidance is ordinary CFG."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffstage.callbacks import reads


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# --- text_encoding ------------------------------------------------------------
@reads()  # nothing from the request: the encoder outputs only
def combine(outputs, req, settings, negative):
    """Three encoders' outputs -> the transformer's prompt_embeds [B, 77 + L, D_t5] and pooled [B, 2 * D_clip]."""
    clip = torch.cat([outputs["clip_l_hidden"], outputs["clip_g_hidden"]], dim=-1)
    t5 = outputs["t5_embeds"]
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # to T5's width (a negative pad crops, as in Diffusers)
    return {"prompt_embeds": torch.cat([clip, t5], dim=-2),
            "pooled_prompt_embeds": torch.cat([outputs["clip_l_pooled"], outputs["clip_g_pooled"]], dim=-1)}


# --- latent_preparation -------------------------------------------------------
@reads("height", "width")
def latent_shape(req, settings, transformer, vae):
    scale = vae_scale_factor(vae)
    return transformer.config.in_channels, req.height // scale, req.width // scale


# --- denoising ----------------------------------------------------------------
def model_inputs(req, settings, transformer, negative):
    prefix = "negative_" if negative else ""
    return {"encoder_hidden_states": getattr(req, f"{prefix}prompt_embeds"),
            "pooled_projections": getattr(req, f"{prefix}pooled_prompt_embeds")}
