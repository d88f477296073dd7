"""Build tiny random-weight Qwen-Image and Qwen-Image-Edit checkpoints in Diffusers format (for tests).

They load with ``diffusers.QwenImagePipeline.from_pretrained(out_dir)`` and
``QwenImageEditPipeline.from_pretrained(out_dir, processor=...)``; weights and the tokenizer (a
byte-level BPE with Qwen's chat and vision tokens) are generated locally, nothing is downloaded.

CLI: ``python -m diffstage.models.qwen_image.tiny OUT_DIR [--seed N] [--edit]``"""
from __future__ import annotations

import argparse
import pathlib
import shutil

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                       QwenImagePipeline, QwenImageTransformer2DModel)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from diffstage.models.flux.tiny import WORDS, _bytes_to_unicode, word_merges
from diffstage.models.qwen_image.processor import Qwen2VLImageTextProcessor
from diffstage.models.tiny_checkpoint import save_tiny_checkpoint

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The transformer's dimensions: "tiny" for tests, "bench" for benchmarks (enough blocks and width that skipping
# blocks shows in the time, still seconds per image on a CPU). The rotary axes add up to the head dimension.
SIZES = {
    "tiny": {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 4, "axes_dims_rope": (8, 4, 4)},
    "bench": {"num_layers": 8, "attention_head_dim": 32, "num_attention_heads": 6, "axes_dims_rope": (16, 8, 8)},
}


def qwen_tokenizer(words=WORDS, special=("<|im_start|>", "<|im_end|>")) -> Qwen2Tokenizer:
    """Byte-level BPE over every byte plus whole-word merges for `words`, and Qwen's chat tokens."""
    vocab: dict[str, int] = {}
    for sym in _bytes_to_unicode():
        vocab.setdefault(sym, len(vocab))
    merges = word_merges([list("Ġ" + word) for word in words], vocab)  # Ġ: the byte-level space before a word
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def _modules(seed: int, tokenizer, edit: bool, size: str = "tiny") -> dict:
    """The models (the Edit checkpoint's VAE has Qwen's real 8x downsampling, so that the 1024x1024 copy of
    the input image it encodes stays at 4096 tokens, and its text encoder knows the vision tokens)."""
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, joint_attention_dim=16,
                                              guidance_embeds=False, **SIZES[size])
    torch.manual_seed(seed)
    if edit:
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                     latents_std=[0.9, 1.1, 0.8, 1.2])
    else:
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
        **(vision_ids(tokenizer) if edit else {"vision_start_token_id": len(tokenizer) + 1,
                                                "vision_end_token_id": len(tokenizer) + 2,
                                                "vision_token_id": len(tokenizer) + 3}))
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, time_shift_type="exponential")
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, transformer=transformer)


def vision_ids(tokenizer) -> dict[str, int]:
    """The text encoder's ids of the vision tokens, as the tokenizer numbers them."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in
            (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
             ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}


def edit_processor(tokenizer) -> Qwen2VLImageTextProcessor:
    """Qwen2.5-VL's image processor with few pixels (an image becomes a handful of vision tokens)."""
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    return Qwen2VLImageTextProcessor(image_processor=images, tokenizer=tokenizer)


class _EditCheckpoint:
    """Saves the Edit pipeline with its processor laid out as the Qwen repos have it: tokenizer files and
    preprocessor_config.json in processor/ (and Qwen2VLProcessor in model_index.json)."""

    def __init__(self, pipe: QwenImageEditPipeline):
        self.pipe = pipe

    def save_pretrained(self, out_dir, **kwargs) -> None:
        self.pipe.save_pretrained(out_dir, **kwargs)
        folder = pathlib.Path(out_dir) / "processor"
        shutil.rmtree(folder)
        self.pipe.processor.tokenizer.save_pretrained(folder)
        self.pipe.processor.image_processor.save_pretrained(folder)


def _build_pipeline(seed: int, size: str = "tiny"):
    tokenizer = qwen_tokenizer()
    return QwenImagePipeline(tokenizer=tokenizer, **_modules(seed, tokenizer, edit=False, size=size))


def _build_edit_pipeline(seed: int):
    tokenizer = qwen_tokenizer(special=("<|im_start|>", "<|im_end|>", *VISION_TOKENS))
    pipe = QwenImageEditPipeline(tokenizer=tokenizer, processor=edit_processor(tokenizer),
                                 **_modules(seed, tokenizer, edit=True))
    return _EditCheckpoint(pipe)


def build_tiny_qwen_image(out_dir, *, seed: int = 0, size: str = "tiny") -> pathlib.Path:
    """Write the checkpoint of ``size`` (see SIZES) to ``out_dir`` (deterministic in ``seed``); returns at once if it
    is there."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    marker = {"family": "qwen_image", "seed": seed} | ({"size": size} if size != "tiny" else {})
    return save_tiny_checkpoint(out_dir, marker, lambda: _build_pipeline(seed, size), index_classes=None)


def build_tiny_qwen_image_edit(out_dir, *, seed: int = 0) -> pathlib.Path:
    """The same for QwenImageEditPipeline (its text encoder sees the input image)."""
    return save_tiny_checkpoint(out_dir, {"family": "qwen_image_edit", "seed": seed},
                                lambda: _build_edit_pipeline(seed), index_classes={"processor": "Qwen2VLProcessor"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build a tiny random-weight Qwen-Image (or -Edit) checkpoint.")
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edit", action="store_true", help="a QwenImageEditPipeline checkpoint")
    args = parser.parse_args()
    print((build_tiny_qwen_image_edit if args.edit else build_tiny_qwen_image)(args.out_dir, seed=args.seed))
