"""Build a tiny random-weight Sana checkpoint in Diffusers format (for tests).

It loads with ``diffusers.SanaPipeline.from_pretrained(out_dir)``; weights and the tokenizer (a
Gemma-style BPE with byte fallback) are generated locally, nothing is downloaded. The scheduler
is the one Sana ships: DPM-Solver++ multistep on flow sigmas (flow prediction, shift 3).

CLI: ``python -m diffstage.models.sana.tiny OUT_DIR [--seed N]``"""
from __future__ import annotations

import pathlib

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from diffstage.models.flux.tiny import PUNCT, WORDS, word_merges
from diffstage.models.tiny_checkpoint import save_tiny_checkpoint, tiny_cli

# Gemma's special tokens, in Gemma's order (pad 0, eos 1, bos 2, unk 3).
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
TEXT_WIDTH = 16  # the Gemma hidden size: the transformer's caption_channels


def gemma_tokenizer(words=WORDS) -> GemmaTokenizer:
    """A Gemma-style BPE: every byte as a fallback token, letters, digits and punctuation, and whole-word merges
    for `words` ("▁word", as Gemma writes a space). It adds <bos> and pads on the left, as Gemma's does."""
    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    for symbol in ["▁", *chars, *(str(d) for d in range(10)), *PUNCT]:
        vocab.setdefault(symbol, len(vocab))
    merges = word_merges([list("▁" + word) for word in words], vocab)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _build_pipeline(seed: int) -> SanaPipeline:
    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=TEXT_WIDTH, mlp_ratio=2.5, sample_size=16, patch_size=1)
    torch.manual_seed(seed)
    # Two levels: a 2x VAE (Sana's real one is 32x); non-trivial scaling_factor so forgetting it shows.
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407)
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


def build_tiny_sana(out_dir, *, seed: int = 0) -> pathlib.Path:
    """Write the checkpoint to ``out_dir`` (deterministic in ``seed``); returns at once if it is there."""
    return save_tiny_checkpoint(out_dir, {"family": "sana", "seed": seed}, lambda: _build_pipeline(seed),
                                index_classes={"tokenizer": "GemmaTokenizerFast"})


if __name__ == "__main__":
    tiny_cli(build_tiny_sana, "Build a tiny random-weight Sana checkpoint.")
