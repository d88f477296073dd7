"""Build a tiny random-weight Stable Diffusion 1.5 checkpoint in Diffusers format (for tests).

One set of weights serves three pipelines, told apart by model_index.json's ``_class_name``:
``t2i`` (StableDiffusionPipeline), ``img2img`` (StableDiffusionImg2ImgPipeline, the same
weights) and ``inpaint`` (StableDiffusionInpaintPipeline: the UNet takes 9 channels, the
noisy latents, the mask and the masked image's latents). The scheduler is SD 1.5's own
(PNDM) or DDIM / Euler with the same noise schedule. No safety checker or feature extractor,
nothing downloaded: weights and the CLIP tokenizer are generated locally.

CLI: ``python -m diffstage.models.sd15.tiny OUT_DIR [--variant t2i|img2img|inpaint]
[--scheduler pndm|ddim|euler] [--seed N]``"""
from __future__ import annotations

import argparse
import pathlib

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel

from diffstage.models.flux.tiny import clip_tokenizer
from diffstage.models.tiny_checkpoint import save_tiny_checkpoint

PIPELINES = {"t2i": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
             "inpaint": StableDiffusionInpaintPipeline}

# SD 1.5's noise schedule (its scheduler/scheduler_config.json), shared by every scheduler offered.
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             steps_offset=1)
SCHEDULERS = {
    "pndm": lambda: PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False),
    "ddim": lambda: DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False),
    # "leading" spacing: init_noise_sigma is sqrt(sigma_max^2 + 1), not 1, so a stage that skips it shows
    "euler": lambda: EulerDiscreteScheduler(**BETAS, timestep_spacing="leading"),
}


def _unet(in_channels: int, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    # vae_scale_factor 2 (two levels); SD's quant convs and scaling factor, no shift
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.18215)


def _text_encoder(tokenizer, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def _build_pipeline(variant: str, scheduler: str, seed: int):
    tokenizer = clip_tokenizer()
    return PIPELINES[variant](
        vae=_vae(seed), text_encoder=_text_encoder(tokenizer, seed), tokenizer=tokenizer,
        unet=_unet(9 if variant == "inpaint" else 4, seed), scheduler=SCHEDULERS[scheduler](),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sd15(out_dir, *, variant: str = "t2i", scheduler: str = "pndm", seed: int = 0) -> pathlib.Path:
    """Write the ``variant`` checkpoint ("t2i", "img2img" or "inpaint") with ``scheduler`` ("pndm", "ddim" or
    "euler") to ``out_dir`` (deterministic in ``seed``); returns at once if it is there."""
    if variant not in PIPELINES:
        raise ValueError(f"variant must be one of {tuple(PIPELINES)}, got {variant!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)}, got {scheduler!r}")
    marker = {"family": "sd15", "variant": variant, "scheduler": scheduler, "seed": seed}
    return save_tiny_checkpoint(out_dir, marker, lambda: _build_pipeline(variant, scheduler, seed))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight Stable Diffusion 1.5 checkpoint.")
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--variant", choices=tuple(PIPELINES), default="t2i")
    parser.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="pndm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_sd15(args.out_dir, variant=args.variant, scheduler=args.scheduler, seed=args.seed))


if __name__ == "__main__":
    main()
