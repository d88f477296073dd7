"""Sana callbacks for the standard stages (math follows Diffusers' SanaPipeline).

Sana conditions on Gemma-2's last hidden states with their attention mask. The prompt is
lower-cased and stripped, the positive one follows a long "complex human instruction" (the
YAML's settings) and is padded on the right to the instruction's tokens plus
max_sequence_length - 2; of those, the first token (<bos>) and the last max_sequence_length - 1
condition the transformer. The negative prompt has no instruction: max_sequence_length tokens.
Latents are plain VAE latents (AutoencoderDC, no shift); the scheduler is DPM-Solver on flow
sigmas, and the transformer takes the timestep as the scheduler gives it."""
from __future__ import annotations

from diffstage.callbacks import reads
from diffstage.errors import StageError


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


# --- text_encoding ------------------------------------------------------------
def instruction(settings) -> str:
    """The complex human instruction (settings.complex_human_instruction: its lines), "" for none."""
    return "\n".join(settings.get("complex_human_instruction") or ())


@reads()  # nothing from the request: the stage's outputs may be reused across calls
def prompt_transform(prompts, req, settings, negative):
    """Diffusers' _text_preprocessing with clean_caption=False (both branches), then the instruction before each
    positive prompt."""
    prompts = [p.lower().strip() for p in prompts]
    return prompts if negative else [instruction(settings) + p for p in prompts]


@reads("max_sequence_length")
def max_length(field, tokenizer, req, settings, negative):
    """The positive prompt keeps room for its instruction: its tokens (with <bos>) + max_sequence_length - 2."""
    text = "" if negative else instruction(settings)
    return len(tokenizer.encode(text)) + req.max_sequence_length - 2 if text else req.max_sequence_length


@reads("max_sequence_length")
def combine(outputs, req, settings, negative):
    """The transformer's text: <bos> and the last max_sequence_length - 1 tokens (the prompt after the
    instruction, Sana paper section 3.1); the negative prompt has exactly max_sequence_length already."""
    embeds, mask = outputs["gemma_hidden"], outputs["gemma_mask"]
    if not negative:
        keep = [0, *range(embeds.shape[1] - req.max_sequence_length + 1, embeds.shape[1])]
        embeds, mask = embeds[:, keep], mask[:, keep]
    return {"prompt_embeds": embeds, "text_mask": mask}


# --- latent_preparation -------------------------------------------------------
@reads("height", "width")
def latent_shape(req, settings, transformer, vae):
    scale = vae_scale_factor(vae)
    return transformer.config.in_channels, req.height // scale, req.width // scale


# --- denoising ----------------------------------------------------------------
@reads("text_mask")
def model_inputs(req, settings, transformer, negative):
    scale = transformer.config.get("timestep_scale", 1.0)
    if scale != 1.0:  # SanaPipeline multiplies the timestep by it; the timestep_input callback cannot see it
        raise StageError(f"sana: the transformer's config has timestep_scale {scale}; this YAML serves "
                         "SanaPipeline checkpoints, whose timestep_scale is 1.0")
    prefix = "negative_" if negative else ""
    return {"encoder_hidden_states": getattr(req, f"{prefix}prompt_embeds"),
            "encoder_attention_mask": getattr(req, f"{prefix}text_mask")}
