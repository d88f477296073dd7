"""Build a tiny random-weight Stable Diffusion 3 checkpoint in Diffusers format (for tests).

It loads with ``diffusers.StableDiffusion3Pipeline.from_pretrained(out_dir)``; weights and
tokenizers are generated locally, nothing is downloaded.

CLI: ``python -m diffstage.models.sd3.tiny OUT_DIR [--seed N]``"""
from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffstage.models.flux.tiny import clip_tokenizer, t5_tokenizer
from diffstage.models.tiny_checkpoint import save_tiny_checkpoint, tiny_cli


def _clip(tokenizer, seed: int, width: int = 32) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _build_pipeline(seed: int) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.5, shift_factor=0.06,
                        use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=_clip(tokenizer, seed),
        tokenizer=tokenizer, text_encoder_2=_clip(tokenizer, seed + 1), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=tokenizer_3)


def build_tiny_sd3(out_dir, *, seed: int = 0) -> pathlib.Path:
    """Write the checkpoint to ``out_dir`` (deterministic in ``seed``); returns at once if it is there."""
    return save_tiny_checkpoint(out_dir, {"family": "sd3", "seed": seed}, lambda: _build_pipeline(seed),
                                index_classes={"tokenizer_3": "T5TokenizerFast"})


if __name__ == "__main__":
    tiny_cli(build_tiny_sd3, "Build a tiny random-weight Stable Diffusion 3 checkpoint.")
