"""PixArt-Sigma callbacks for the standard stages (math follows Diffusers' PixArtSigmaPipeline).

PixArt conditions on T5 states together with their attention mask, predicts noise and a
learned variance (twice the latent channels; the variance half is dropped), and runs
DPM-Solver (or any ε-prediction scheduler: the denoising stage applies init_noise_sigma,
scale_model_input and the step's generator/eta, as Diffusers' UNet-era pipelines do)."""
from __future__ import annotations

from diffstage.callbacks import reads


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# --- latent_preparation -------------------------------------------------------
@reads("height", "width")
def latent_shape(req, settings, transformer, vae):
    scale = vae_scale_factor(vae)
    return transformer.config.in_channels, req.height // scale, req.width // scale


# --- denoising ----------------------------------------------------------------
@reads("text_mask")
def model_inputs(req, settings, transformer, negative):
    prefix = "negative_" if negative else ""
    return {"encoder_hidden_states": getattr(req, f"{prefix}prompt_embeds"),
            "encoder_attention_mask": getattr(req, f"{prefix}text_mask"),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # PixArt-Sigma: no micro-conditions


def postprocess_prediction(pred, req, settings):
    """Learned sigma: the transformer predicts noise and variance; the scheduler takes the noise."""
    channels = req.latents.shape[1]
    return pred.chunk(2, dim=1)[0] if pred.shape[1] == 2 * channels else pred
