"""Build a tiny random-weight Stable Diffusion XL checkpoint in Diffusers format (for tests).

It loads with ``diffusers.StableDiffusionXLPipeline.from_pretrained(out_dir)``; weights and
tokenizers are generated locally, nothing is downloaded. As in the real SDXL base: two CLIP
encoders (the second with a projection, whose pooled output conditions the UNet), a UNet with
"text_time" added conditioning, a VAE with quant convs, Euler; the encoders have different
widths so that swapping them cannot go unnoticed. `force_zeros_for_empty_prompt` is written to
model_index.json as given (SDXL base: true).

CLI: ``python -m diffstage.models.sdxl.tiny OUT_DIR [--seed N]``"""
from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffstage.models.flux.tiny import clip_tokenizer
from diffstage.models.tiny_checkpoint import save_tiny_checkpoint, tiny_cli

WIDTH, WIDTH_2 = 32, 48  # the two encoders' widths (SDXL: 768 and 1280)
TIME_EMBED_DIM = 8  # per micro-conditioning number; six of them (original size, crop, target size)

# EulerDiscreteScheduler as stabilityai/stable-diffusion-xl-base-1.0 ships it.
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                 use_karras_sigmas=False)


def _clip(cls, tokenizer, seed: int, width: int, act: str):
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width, hidden_act=act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _build_pipeline(seed: int, force_zeros_for_empty_prompt: bool) -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    tokenizer_2.pad_token = "!"  # as SDXL's second tokenizer: pads with "!", not end-of-text
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2), norm_num_groups=4,
        cross_attention_dim=WIDTH + WIDTH_2, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + WIDTH_2)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.13025)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=_clip(CLIPTextModel, tokenizer, seed, WIDTH, "quick_gelu"), tokenizer=tokenizer,
        text_encoder_2=_clip(CLIPTextModelWithProjection, tokenizer_2, seed + 1, WIDTH_2, "gelu"),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)


def build_tiny_sdxl(out_dir, *, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> pathlib.Path:
    """Write the checkpoint to ``out_dir`` (deterministic in ``seed``); returns at once if it is there."""
    marker = {"family": "sdxl", "seed": seed, "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt}
    return save_tiny_checkpoint(out_dir, marker, lambda: _build_pipeline(seed, force_zeros_for_empty_prompt))


if __name__ == "__main__":
    tiny_cli(build_tiny_sdxl, "Build a tiny random-weight Stable Diffusion XL checkpoint.")
