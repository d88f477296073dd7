"""Build a tiny random-weight Qwen-Image checkpoint in Diffusers format (for tests).

It loads with ``diffusers.QwenImagePipeline.from_pretrained(out_dir)``; weights and the
tokenizer (a byte-level BPE with Qwen's chat tokens) are generated locally, nothing is downloaded.

CLI: ``python -m diffstage.models.qwen_image.tiny OUT_DIR [--seed N]``"""
from __future__ import annotations

import pathlib

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from diffstage.models.flux.tiny import WORDS, _bytes_to_unicode, word_merges
from diffstage.models.tiny_checkpoint import save_tiny_checkpoint, tiny_cli


def qwen_tokenizer(words=WORDS) -> Qwen2Tokenizer:
    """Byte-level BPE over every byte plus whole-word merges for `words`, and Qwen's chat tokens."""
    vocab: dict[str, int] = {}
    for sym in _bytes_to_unicode():
        vocab.setdefault(sym, len(vocab))
    merges = word_merges([list("Ġ" + word) for word in words], vocab)  # Ġ: the byte-level space before a word
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _build_pipeline(seed: int) -> QwenImagePipeline:
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1] * 4, latents_std=[0.9] * 4)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        vision_start_token_id=len(tokenizer) + 1,
        vision_end_token_id=len(tokenizer) + 2, vision_token_id=len(tokenizer) + 3)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def build_tiny_qwen_image(out_dir, *, seed: int = 0) -> pathlib.Path:
    """Write the checkpoint to ``out_dir`` (deterministic in ``seed``); returns at once if it is there."""
    return save_tiny_checkpoint(out_dir, {"family": "qwen_image", "seed": seed}, lambda: _build_pipeline(seed),
                                index_classes=None)


if __name__ == "__main__":
    tiny_cli(build_tiny_qwen_image, "Build a tiny random-weight Qwen-Image checkpoint.")
