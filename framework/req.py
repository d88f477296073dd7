"""Req: the one object that flows through the stages.

Every field is named once, here. Request fields come from the caller (or the
model's sampling defaults); state fields are written by stages. The static
check uses this split: a stage may read a request field freely, but a state
field only after an earlier stage writes it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _request(default: Any = None, doc: str = "") -> Any:
    return field(default=default, metadata={"role": "request", "doc": doc})


def _state(doc: str = "") -> Any:
    return field(default=None, metadata={"role": "state", "doc": doc})


@dataclass
class Req:
    # --- request: what the caller asks for -------------------------------
    prompt: str | list[str] | None = _request(None, "text prompt(s)")
    prompt_2: str | list[str] | None = _request(None, "prompt for the second text encoder; defaults to prompt")
    negative_prompt: str | list[str] | None = _request(None, "negative prompt(s) for classifier-free guidance")
    seed: int | None = _request(None, "seed of the CPU generator the initial noise is drawn from")
    num_inference_steps: int | None = _request(None, "number of denoising steps")
    height: int | None = _request(None, "output height in pixels")
    width: int | None = _request(None, "output width in pixels")
    guidance_scale: float | None = _request(None, "guidance scale (embedded guidance for distilled models)")
    true_cfg_scale: float | None = _request(None, "classifier-free guidance scale applied with a negative prompt")
    max_sequence_length: int | None = _request(None, "token length of the sequence text encoder")
    num_images_per_prompt: int = _request(1, "images generated per prompt")
    output_type: str = _request("pil", "'pil', 'np', 'pt' or 'latent'")
    input_latents: Any = _request(None, "optional initial latents instead of random noise")

    # --- state: written by stages ------------------------------------------
    batch_size: int | None = _state("number of prompts times images per prompt")
    generator: Any = _state("torch.Generator seeded from `seed`")
    do_cfg: bool | None = _state("whether classifier-free guidance runs")
    cfg_scale: float | None = _state("the CFG scale in use")
    prompt_embeds: Any = _state("sequence text embeddings [B, L, D]")
    pooled_prompt_embeds: Any = _state("pooled text embeddings [B, D]")
    negative_prompt_embeds: Any = _state("sequence embeddings of the negative prompt")
    negative_pooled_prompt_embeds: Any = _state("pooled embeddings of the negative prompt")
    text_position_ids: Any = _state("position ids of text tokens (e.g. for RoPE)")
    latents: Any = _state("latents being denoised (packed if the model packs them)")
    raw_latent_shape: tuple | None = _state("latent shape before packing, [B, C, H, W]")
    image_position_ids: Any = _state("position ids of latent tokens (e.g. for RoPE)")
    timesteps: Any = _state("timestep schedule, one per step")
    sigmas: Any = _state("noise levels of the schedule")
    decoded: Any = _state("decoded images as a tensor in [0, 1], [B, C, H, W]")
    output: Any = _state("final output in `output_type` form")

    # Free-form extras a custom stage may attach (not checked statically).
    extra: dict = field(default_factory=dict, metadata={"role": "internal", "doc": "custom stage scratch space"})

    @classmethod
    def field_names(cls, role: str | None = None) -> set[str]:
        return {f.name for f in fields(cls) if role is None or f.metadata.get("role") == role}

    @classmethod
    def request_fields(cls) -> set[str]:
        return cls.field_names("request")

    @classmethod
    def state_fields(cls) -> set[str]:
        return cls.field_names("state")

    def prompts(self) -> list:
        """The prompts as a list (items are not checked here: InputValidationStage does that)."""
        p = self.prompt
        if p is None:
            return []
        return list(p) if isinstance(p, (list, tuple)) else [p]

    def requested_batch_size(self) -> int:
        """Prompts times images per prompt: the batch the stages will run."""
        n = self.num_images_per_prompt
        return len(self.prompts()) * (n if isinstance(n, int) and not isinstance(n, bool) else 1)
