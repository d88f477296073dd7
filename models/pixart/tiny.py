"""Build a tiny random-weight PixArt-Sigma checkpoint in Diffusers format (for tests).

It loads with ``diffusers.PixArtSigmaPipeline.from_pretrained(out_dir)``; weights and the
tokenizer are generated locally, nothing is downloaded. The scheduler is PixArt-Sigma's own
(DPM-Solver multistep); the transformer predicts a learned variance (8 output channels).

CLI: ``python -m diffstage.models.pixart.tiny OUT_DIR [--seed N]``"""
from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel

from diffstage.models.flux.tiny import t5_tokenizer
from diffstage.models.tiny_checkpoint import save_tiny_checkpoint, tiny_cli


def _build_pipeline(seed: int) -> PixArtSigmaPipeline:
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4, caption_channels=32,
        in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.13025)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                            beta_end=0.02, prediction_type="epsilon")
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)


def build_tiny_pixart(out_dir, *, seed: int = 0) -> pathlib.Path:
    """Write the checkpoint to ``out_dir`` (deterministic in ``seed``); returns at once if it is there."""
    return save_tiny_checkpoint(out_dir, {"family": "pixart", "seed": seed}, lambda: _build_pipeline(seed),
                                index_classes={"tokenizer": "T5TokenizerFast"})


if __name__ == "__main__":
    tiny_cli(build_tiny_pixart, "Build a tiny random-weight PixArt-Sigma checkpoint.")
