"""Stable Diffusion 1.5 callbacks for the standard stages (math follows Diffusers' StableDiffusionPipeline).

SD 1.5 conditions its UNet on CLIP's last hidden states (77 tokens) and nothing else; the
latents are plain 4-D VAE latents. Everything else (init_noise_sigma, scale_model_input,
the scheduler's generator and eta, CFG, the VAE's scaling factor) is a standard stage default.
latent_shape is latent_preparation's callback, model_inputs denoising's (README, "A UNet model")."""
from __future__ import annotations

from diffstage.callbacks import reads


@reads("height", "width")
def latent_shape(req, settings, transformer, vae):
    """The VAE's latent channels (an inpainting UNet takes more: mask and masked image), its spatial scale."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, req.height // scale, req.width // scale


def model_inputs(req, settings, transformer, negative):
    return {"encoder_hidden_states": req.negative_prompt_embeds if negative else req.prompt_embeds}
