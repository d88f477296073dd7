"""Build a tiny random-weight FLUX.1 checkpoint in Diffusers format.

The result loads with ``diffusers.FluxPipeline.from_pretrained(out_dir)`` and runs a
32x32 / 2-step generation in a fraction of a second on CPU. Everything (weights and
tokenizers) is generated locally, so nothing is downloaded.

CLI: ``python -m diffstage.models.flux.tiny OUT_DIR [--variant dev|schnell] [--seed N]``
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from diffstage.models.tiny_checkpoint import save_tiny_checkpoint

VARIANTS = ("dev", "schnell")

# Small word list so common test prompts tokenize into whole words; anything else falls
# back to characters (CLIP: full byte coverage, T5: letters/digits/punctuation, else <unk>).
WORDS = (
    "a an the of and in on with at photo picture painting of red green blue yellow black white "
    "cat dog fox bird tree house car sky sea mountain forest city street flower portrait "
    "cute big small blurry sharp bad good quality high low night day sun moon astronaut horse"
).split()
PUNCT = list(".,!?'\"-:;()")

# Scheduler configs copied from the real FLUX.1 repos.
SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet (the 256 symbols ByteLevel pre-tokenization emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def word_merges(words: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges that build each word whole, left to right, from its pieces (symbols already in
    `vocab`); the merged pieces are added to `vocab`."""
    merges: list[tuple[str, str]] = []
    for pieces in words:
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return merges


def clip_tokenizer(words=WORDS) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer with whole-word merges for `words`."""
    # Every byte symbol exists both word-internal and word-final ("</w>"), so no text ever
    # hits unk (which is <|endoftext|> in CLIP and would confuse the pooler).
    vocab: dict[str, int] = {}
    for sym in _bytes_to_unicode():
        vocab.setdefault(sym, len(vocab))
    for sym in _bytes_to_unicode():
        vocab.setdefault(sym + "</w>", len(vocab))
    merges = word_merges([list(word[:-1]) + [word[-1] + "</w>"] for word in words], vocab)
    # Like real CLIP the special tokens are the last two ids; pad == eos == unk.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer(words=WORDS) -> T5TokenizerFast:
    """A Unigram T5 tokenizer over letters, digits and punctuation plus whole `words`."""
    # Unigram vocab in T5 order: <pad>=0, </s>=1, <unk>=2. Whole words score higher than chars.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += [str(d) for d in range(10)] + PUNCT
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -5.5) for c in chars]
    vocab += [("▁" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _reinit_if_zero(module: torch.nn.Module) -> None:
    # Guard against zero-initialised output layers, which would make the image independent of
    # the transformer (and thus of the prompt).
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear) and not sub.weight.any():
            torch.nn.init.normal_(sub.weight, std=0.02)


def text_encoders(tokenizer, tokenizer_2, seed: int, width: int = 32) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Small random CLIP and T5 text encoders matching the two tokenizers."""
    torch.manual_seed(seed)
    # eos_token_id != 2 selects the "first eos position" pooling path in CLIPTextTransformer.
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    return clip, t5


# tiny: for tests (a 32x32, 2-step image in a fraction of a second). bench: large enough that
# the transformer dominates a 256x256 image (hidden 768, 2 double + 4 single blocks), for
# benchmarks/bench_flux.py.
SIZES = {
    "tiny": dict(
        transformer=dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                         axes_dims_rope=(4, 6, 6)),
        vae=dict(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4),
        text_width=32),
    "bench": dict(
        transformer=dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                         num_attention_heads=12, joint_attention_dim=64, pooled_projection_dim=64,
                         axes_dims_rope=(16, 24, 24)),
        vae=dict(latent_channels=16, block_out_channels=(16, 32, 32, 32), norm_num_groups=8),
        text_width=64),
}


def _build_pipeline(variant: str, seed: int, size: str = "tiny") -> FluxPipeline:
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    dims = SIZES[size]

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, guidance_embeds=(variant == "dev"), **dims["transformer"])
    _reinit_if_zero(transformer.proj_out)
    _reinit_if_zero(transformer.norm_out)

    torch.manual_seed(seed)
    # vae_scale_factor = 2 ** (levels - 1); no quant convs, as in the real FLUX VAE. Non-trivial
    # scaling/shift factors so callers that forget them produce different numbers.
    levels = len(dims["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, sample_size=32,
        scaling_factor=0.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False, **dims["vae"],
    )

    text_encoder, text_encoder_2 = text_encoders(tokenizer, tokenizer_2, seed, width=dims["text_width"])
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant])
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def _marker(variant: str, seed: int, size: str) -> dict:
    return {"family": "flux", "variant": variant, "seed": seed} | ({"size": size} if size != "tiny" else {})


def build_tiny_flux(out_dir, *, variant: str = "dev", seed: int = 0, size: str = "tiny") -> pathlib.Path:
    """Write a random FLUX.1 ``variant`` ("dev" or "schnell") checkpoint of ``size`` ("tiny"
    or "bench", see SIZES) to ``out_dir``.

    Deterministic in ``seed``. Returns immediately if ``out_dir`` already holds a complete
    checkpoint for the same variant/seed/size (see diffstage.models.tiny_checkpoint).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    # transformers 5 aliases T5TokenizerFast to T5Tokenizer; record the name the real FLUX.1 repos use
    # (it also resolves in transformers 4 without sentencepiece)
    return save_tiny_checkpoint(out_dir, _marker(variant, seed, size), lambda: _build_pipeline(variant, seed, size),
                                index_classes={"tokenizer_2": "T5TokenizerFast"})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight FLUX.1 checkpoint.")
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--variant", choices=VARIANTS, default="dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    args = parser.parse_args(argv)
    print(build_tiny_flux(args.out_dir, variant=args.variant, seed=args.seed, size=args.size))


if __name__ == "__main__":
    main()
