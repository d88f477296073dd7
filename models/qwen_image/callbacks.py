"""Qwen-Image callbacks for the standard stages (math follows Diffusers' QwenImagePipeline).

Qwen-Image encodes the prompt inside a chat template with Qwen2.5-VL, keeps the last hidden
states of the real tokens after the template's 34-token prefix, and conditions on them with
their mask. Latents are FLUX-style 2x2 patches of a one-frame video latent; true CFG rescales
the combined prediction to the conditional one's norm."""
from __future__ import annotations

import torch

from diffstage.callbacks import reads


def vae_scale_factor(vae) -> int:
    return 2 ** len(vae.config.temperal_downsample)


# --- text_encoding ------------------------------------------------------------
def prompt_tokens(outputs, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's real tokens after the template prefix, zero-padded to the longest, and their mask."""
    hidden, mask = outputs["qwen_hidden"], outputs["qwen_mask"].bool()
    kept = [h[m][settings.drop_tokens:] for h, m in zip(hidden, mask)]
    longest = max(k.shape[0] for k in kept)
    embeds = torch.stack([torch.cat([k, k.new_zeros(longest - k.shape[0], k.shape[1])]) for k in kept])
    keep = torch.stack([(torch.arange(longest) < k.shape[0]).long() for k in kept]).to(hidden.device)
    return embeds, keep


@reads("max_sequence_length")
def combine(outputs, req, settings, negative):
    """The prompt tokens and their mask, cut to max_sequence_length."""
    embeds, keep = prompt_tokens(outputs, settings)
    n = req.max_sequence_length
    return {"prompt_embeds": embeds[:, :n], "prompt_embeds_mask": keep[:, :n]}


# --- latent_preparation -------------------------------------------------------
@reads("height", "width")
def latent_shape(req, settings, transformer, vae):
    """(1, channels, height, width): Diffusers draws [B, 1, C, H, W] noise; H and W are whole 2x2 patches."""
    scale = vae_scale_factor(vae) * 2
    return 1, transformer.config.in_channels // 4, 2 * (req.height // scale), 2 * (req.width // scale)


def pack(latents, req, settings):
    """[B, 1, C, H, W] -> [B, (H/2)*(W/2), C*4]."""
    b, _, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


# --- denoising ----------------------------------------------------------------
@reads("raw_latent_shape")
def model_inputs(req, settings, transformer, negative):
    prefix = "negative_" if negative else ""
    _, _, _, h, w = req.raw_latent_shape
    return {"encoder_hidden_states": getattr(req, f"{prefix}prompt_embeds"),
            "encoder_hidden_states_mask": getattr(req, f"{prefix}prompt_embeds_mask"),
            # one entry per prompt, as Diffusers passes it
            "img_shapes": [[(1, h // 2, w // 2)]] * len(req.prompts()),
            "guidance": None}


def combine_cfg(cond, uncond, scale):
    """True CFG, rescaled to the conditional prediction's norm per token."""
    combined = uncond + scale * (cond - uncond)
    return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


# --- decoding -----------------------------------------------------------------
@reads("raw_latent_shape")
def unpack(latents, req, settings, vae):
    """[B, (H/2)*(W/2), C*4] -> [B, C, 1, H, W] (the video VAE's layout)."""
    b = latents.shape[0]
    _, _, c, h, w = req.raw_latent_shape
    latents = latents.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, c, 1, h, w)


def first_frame(image, settings):
    """The video VAE decodes [B, 3, 1, H, W]; an image is its one frame."""
    return image[:, :, 0]
