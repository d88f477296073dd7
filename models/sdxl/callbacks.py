"""Stable Diffusion XL callbacks for the standard stages (math follows Diffusers' StableDiffusionXLPipeline).

SDXL encodes the prompt with two CLIP encoders: their penultimate hidden states, joined along
the width, are the UNet's cross-attention input, and the second encoder's pooled projection
joins six "micro-conditioning" numbers (original size, crop corner, target size) as the UNet's
added conditioning. Without a negative prompt, checkpoints that say force_zeros_for_empty_prompt
(SDXL base) guide against zeros instead of the empty prompt's encoding."""
from __future__ import annotations

import torch

from diffstage.callbacks import reads
from diffstage.errors import RequestError, StageError, shown

MICRO = ("original_size", "crops_coords_top_left", "target_size")  # request fields, in the time ids' order


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# --- text_encoding ------------------------------------------------------------
@reads(optional=("negative_prompt",))
def combine(outputs, req, settings, negative):
    """Both encoders' penultimate states joined -> prompt_embeds; the second's projection -> pooled_prompt_embeds."""
    embeds = torch.cat([outputs["clip_l_hidden"], outputs["clip_g_hidden"]], dim=-1)
    pooled = outputs["clip_g_pooled"]
    if negative and req.negative_prompt is None and settings["force_zeros_for_empty_prompt"]:
        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)  # as Diffusers, even with negative_prompt_2
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


# --- latent_preparation -------------------------------------------------------
@reads("height", "width")
def latent_shape(req, settings, transformer, vae):
    scale = vae_scale_factor(vae)
    return transformer.config.in_channels, req.height // scale, req.width // scale


# --- denoising ----------------------------------------------------------------
def _pair(req, name: str, default) -> list[int]:
    value = getattr(req, name)
    if value is None:
        return list(default)
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        what = "top, left" if name.endswith("crops_coords_top_left") else "height, width"
        raise RequestError(f"{name} must be two non-negative integers ({what}), got {shown(value)}")
    return list(value)


def time_ids(req, negative: bool) -> list[int]:
    """The six micro-conditioning numbers of one branch: the negative_* fields when the request gives a negative
    original and target size (as Diffusers), else the prompt's; sizes default to the image's, the crop to (0, 0)."""
    own = negative and req.negative_original_size is not None and req.negative_target_size is not None
    prefix = "negative_" if own else ""
    size = (req.height, req.width)
    return [n for name, default in zip(MICRO, (size, (0, 0), size)) for n in _pair(req, prefix + name, default)]


def _check_width(transformer, ids: list[int], pooled: torch.Tensor) -> None:
    """The UNet's added embedding takes time_embed_dim per number plus the pooled projection: a checkpoint
    whose parts disagree would fail deep inside the UNet."""
    expected = transformer.add_embedding.linear_1.in_features
    got = transformer.config.addition_time_embed_dim * len(ids) + pooled.shape[-1]
    if got != expected:
        raise StageError(f"the UNet's added embedding takes {expected} numbers, but {len(ids)} micro-conditioning "
                         f"ids x addition_time_embed_dim {transformer.config.addition_time_embed_dim} + the pooled "
                         f"text projection's {pooled.shape[-1]} make {got}: check the unet's and text_encoder_2's "
                         "config.json")


@reads("height", "width", optional=MICRO + tuple(f"negative_{m}" for m in MICRO))
def model_inputs(req, settings, transformer, negative):
    prefix = "negative_" if negative else ""
    embeds, pooled = getattr(req, f"{prefix}prompt_embeds"), getattr(req, f"{prefix}pooled_prompt_embeds")
    ids = time_ids(req, negative)
    _check_width(transformer, ids, pooled)
    ids = torch.tensor([ids], dtype=embeds.dtype, device=embeds.device).repeat(embeds.shape[0], 1)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
