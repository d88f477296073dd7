"""Build a tiny random-weight Wan2.1 text-to-video checkpoint in Diffusers format (for tests).

It loads with ``diffusers.WanPipeline.from_pretrained(out_dir)``; weights and the tokenizer
are generated locally, nothing is downloaded. The scheduler is Wan2.1's own (UniPC with flow
sigmas).

CLI: ``python -m diffstage.models.wan.tiny OUT_DIR [--seed N]``"""
from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from diffstage.models.flux.tiny import t5_tokenizer
from diffstage.models.tiny_checkpoint import save_tiny_checkpoint, tiny_cli


# The transformer's dimensions: "tiny" for tests, "bench" for benchmarks (enough blocks and width that skipping
# blocks shows in the time, still seconds per video on a CPU).
SIZES = {
    "tiny": {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2},
    "bench": {"num_attention_heads": 6, "attention_head_dim": 32, "ffn_dim": 768, "num_layers": 8},
}


def _build_pipeline(seed: int, size: str = "tiny") -> WanPipeline:
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=32,
                                        freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32, **SIZES[size])
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


def build_tiny_wan(out_dir, *, seed: int = 0, size: str = "tiny") -> pathlib.Path:
    """Write the checkpoint of ``size`` (see SIZES) to ``out_dir`` (deterministic in ``seed``); returns at once if it
    is there."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    marker = {"family": "wan", "seed": seed} | ({"size": size} if size != "tiny" else {})
    return save_tiny_checkpoint(out_dir, marker, lambda: _build_pipeline(seed, size),
                                index_classes={"tokenizer": "T5TokenizerFast"})


if __name__ == "__main__":
    tiny_cli(build_tiny_wan, "Build a tiny random-weight Wan2.1 text-to-video checkpoint.")
