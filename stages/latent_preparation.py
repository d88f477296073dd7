"""LatentPreparationStage: draw the initial noise and put it in the model's latent layout."""
from __future__ import annotations

import torch

from diffstage.errors import RequestError, StageError, shown
from diffstage.memory import config_value, numel
from diffstage.req import Req
from diffstage.stage import CallbackSpec, PipelineStage
from diffstage.torch_utils import module_device, module_dtype

# Largest activation of a transformer block, in units of tokens x width (q, k, v, attention
# output, a 4x MLP hidden and its activation): a rough upper bound for one forward pass.
ACTIVATION_WIDTHS = 12


class LatentPreparationStage(PipelineStage):
    """Draws noise of `latent_shape` from the request's CPU generator (as Diffusers'
    randn_tensor does), then lets the model pack it and compute position ids."""

    reads = ("batch_size", "height", "width", "generator")
    optional_reads = ("input_latents",)
    writes = ("latents", "raw_latent_shape")
    optional_writes = ("image_position_ids",)  # None for models without position ids
    module_params = ("transformer", "vae")
    callback_specs = (
        CallbackSpec("latent_shape", ("req", "settings", "transformer", "vae"), required=True,
                     doc="returns the unpacked latent shape (channels, height, width) for one image"),
        CallbackSpec("pack", ("latents", "req", "settings"),
                     doc="returns latents in the transformer's input layout (default: unchanged)"),
        CallbackSpec("position_ids", ("req", "settings"),
                     doc="returns position ids of the latent tokens, or None (default: None)"),
    )

    def __init__(self, transformer, vae):
        super().__init__()
        self.transformer = transformer
        self.vae = vae

    @staticmethod
    def default_pack(latents, req, settings):
        return latents

    @staticmethod
    def default_position_ids(req, settings):
        return None

    def raw_shape(self, req: Req) -> tuple[int, ...]:
        """The unpacked latent shape for the whole batch: [B, C, H, W], or [B, C, F, H, W] for video
        (also before batch_size is set, for the checks that run before the stages)."""
        shape = self.callback("latent_shape")(req, self.settings, self.transformer, self.vae)
        if not isinstance(shape, (tuple, list)) or not shape or \
                not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise StageError(f"LatentPreparationStage: latent_shape must return positive integers (channels, "
                             f"[frames,] height, width) for one image, got {shown(shape)}")
        batch = req.batch_size if req.batch_size is not None else req.requested_batch_size()
        return (batch, *shape)

    def packed_shape(self, raw: tuple[int, ...], req: Req) -> tuple[int, ...]:
        """The shape `pack` gives noise of shape `raw`, found on the meta device (nothing allocated)."""
        return tuple(self.callback("pack")(torch.empty(raw, device="meta"), req, self.settings).shape)

    def request_problems(self, req: Req) -> list[str]:
        if not isinstance(req.input_latents, torch.Tensor):
            return []  # InputValidationStage reports other types
        try:
            expected = self.packed_shape(self.raw_shape(req), req)
        except Exception:  # sizes the other checks refuse; the shape check waits for them
            return []
        if tuple(req.input_latents.shape) != expected:
            return [f"input_latents has shape {list(req.input_latents.shape)}, but this request (batch, height, "
                    f"width) needs {list(expected)}"]
        return []

    def memory_estimate(self, req: Req) -> dict[str, int]:
        raw = self.raw_shape(req)
        itemsize = module_dtype(self.transformer).itemsize
        if numel(raw) >= 2 ** 60:  # past what a tensor can have: no need to look closer
            return {"latents": numel(raw) * itemsize}
        packed = self.packed_shape(raw, req)
        # noise, its packed copy, the model's prediction and the scheduler's next sample
        out = {"latents": 4 * numel(packed) * itemsize}
        heads, head_dim = config_value(self.transformer, "num_attention_heads"), \
            config_value(self.transformer, "attention_head_dim")
        width = heads * head_dim if heads and head_dim else config_value(self.transformer, "hidden_size", "inner_dim")
        if isinstance(width, int) and len(packed) == 3:  # [B, tokens, channels]: a token model
            out["transformer activations"] = ACTIVATION_WIDTHS * packed[0] * packed[1] * width * itemsize
        return out

    per_prompt_seeds = True  # a list of seeds draws each prompt's noise from its own generator (see noise)

    @staticmethod
    def noise(req: Req, shape: tuple[int, ...], dtype) -> torch.Tensor:
        """The initial noise: from the request's generator, or, for a list of seeds (one per prompt), each
        prompt's images from a generator of its own seed, as that prompt would draw them alone (a server's batch
        of requests gives each the noise it would get by itself)."""
        if not isinstance(req.seed, (list, tuple)) or len(req.seed) < 2:
            return torch.randn(shape, generator=req.generator, device=req.generator.device, dtype=dtype)
        per_prompt = shape[0] // len(req.seed)
        return torch.cat([torch.randn((per_prompt, *shape[1:]), generator=torch.Generator("cpu").manual_seed(seed),
                                      dtype=dtype) for seed in req.seed])

    def forward(self, req: Req) -> Req:
        shape = self.raw_shape(req)
        device, dtype = module_device(self.transformer), module_dtype(self.transformer)
        req.raw_latent_shape = shape
        if req.input_latents is not None:
            expected = self.packed_shape(shape, req)
            if tuple(req.input_latents.shape) != expected:
                raise RequestError(self.request_problems(req)[0])
            req.latents = req.input_latents.to(device=device, dtype=dtype)
        else:
            noise = self.noise(req, shape, dtype)
            req.latents = self.callback("pack")(noise.to(device), req, self.settings)
        req.image_position_ids = self.callback("position_ids")(req, self.settings)
        return req
