"""FLUX.1 callbacks for the standard stages (math follows Diffusers' FluxPipeline).

FLUX packs 2x2 latent patches into tokens, gives each token a 3-axis position
id for RoPE, shifts the flow-matching schedule by image size (mu), and embeds
the guidance scale in the transformer (dev) instead of running CFG."""
from __future__ import annotations

import functools

import numpy as np
import torch

from diffstage.callbacks import reads


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# --- latent_preparation -------------------------------------------------------
@reads("height", "width")
def latent_shape(req, settings, transformer, vae):
    """Unpacked latent shape; height/width rounded down to whole 2x2 patches."""
    scale = vae_scale_factor(vae) * 2
    return transformer.config.in_channels // 4, 2 * (req.height // scale), 2 * (req.width // scale)


def pack(latents, req, settings):
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4]."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


@reads("raw_latent_shape", "latents")
def position_ids(req, settings):
    """(0, row, col) for every packed latent token."""
    _, _, h, w = req.raw_latent_shape
    h, w = h // 2, w // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=req.latents.device, dtype=req.latents.dtype)


# --- timestep_preparation -----------------------------------------------------
@reads("num_inference_steps")
def sigmas(req, settings, scheduler):
    if scheduler.config.get("use_flow_sigmas", False):
        return None
    n = req.num_inference_steps
    return np.linspace(1.0, 1 / n, n)


@reads("latents")
def mu(req, settings, scheduler):
    """Shift that grows linearly with the number of image tokens."""
    cfg = scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return req.latents.shape[1] * slope + base_shift - slope * base_len


# --- denoising ----------------------------------------------------------------
@reads("latents", "image_position_ids", optional=("guidance_scale",))
def model_inputs(req, settings, transformer, negative):
    prefix = "negative_" if negative else ""
    embeds = getattr(req, f"{prefix}prompt_embeds")
    pooled = getattr(req, f"{prefix}pooled_prompt_embeds")
    batch = req.latents.shape[0]
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], req.guidance_scale, device=req.latents.device, dtype=torch.float32).expand(batch)
    return {
        "encoder_hidden_states": embeds,
        "pooled_projections": pooled,
        "guidance": guidance,
        "txt_ids": text_ids(embeds.shape[1], embeds.device, embeds.dtype),
        "img_ids": req.image_position_ids,
    }


@functools.lru_cache(maxsize=8)
def text_ids(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's text position ids are all zero; one tensor per shape, so both CFG branches share it
    (and the denoising stage can run them as one batch)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


@reads("latents")
def timestep_input(t, req, settings):
    """FLUX's transformer takes t in [0, 1]."""
    return t.expand(req.latents.shape[0]).to(req.latents.dtype) / 1000


# --- decoding -----------------------------------------------------------------
@reads("raw_latent_shape")
def unpack(latents, req, settings, vae):
    """[B, (H/2)*(W/2), C*4] -> [B, C, H, W]."""
    b = latents.shape[0]
    _, c, h, w = req.raw_latent_shape
    latents = latents.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, c, h, w)
