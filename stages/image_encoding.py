"""ImageEncodingStage: open the request's input image, resize it and encode it with the VAE (for
editing and image-to-image models, which condition on the latents of an input image, or start from them)."""
from __future__ import annotations

import torch

from diffstage.images import open_image
from diffstage.req import Req
from diffstage.stage import CallbackSpec, Contract, PipelineStage
from diffstage.torch_utils import module_device, module_dtype

from .decoding import vae_lock


def image_pixels(image, height: int, width: int):
    """(the image resized to height x width, its pixels [1, 3, H, W] in [-1, 1]), as Diffusers' VaeImageProcessor
    makes them (the sizes are the caller's to choose)."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=1)
    resized = processor.resize(image, height, width)
    return resized, processor.preprocess(resized, height, width)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, generator=None) -> torch.Tensor:
    """The VAE latents of `pixels`: the mean of the latent distribution, or with a generator a sample drawn
    from it (Diffusers' retrieve_latents in its "sample" mode, which image-to-image and inpainting use)."""
    pixels = pixels.to(device=module_device(vae), dtype=module_dtype(vae))
    with vae_lock(vae):  # pipelines share the VAE (see decoding.vae_lock)
        dist = vae.encode(pixels).latent_dist
        return dist.sample(generator) if generator is not None else dist.mode()


def at_full_strength(req: Req, strength_field: str | None) -> bool:
    """Whether the request's strength (in `strength_field`) is 1: a run from pure noise, as Diffusers'
    inpainting pipeline treats it (no image latents to start from)."""
    return strength_field is not None and getattr(req, strength_field) is not None \
        and getattr(req, strength_field) >= 1


class ImageEncodingStage(PipelineStage):
    """Encodes the image in `image_field` into `field` (one copy per batch item).

    Args:
        image_field: the request field with the input image (declare it in the YAML's request_fields).
        field: where the packed latents go.
        resized_field: where the resized PIL image goes, if a later stage needs it (a vision-language
            text encoder that sees the image).
        shape_field: where the shape of the encoded latents before `pack` goes, if a later callback
            needs it (the position ids of the image's tokens).
        frames_axis: the VAE is a video VAE: encode the image as a one-frame video [B, C, 1, H, W].
        sample: draw the latents from the VAE's latent distribution with the request's generator instead of
            taking its mean (Diffusers' image-to-image and inpainting pipelines; the draw comes before the
            noise's when the stage runs before LatentPreparationStage, as in Diffusers).
        strength_field: a request field with a strength in [0, 1]; at 1 the image is not encoded and the
            outputs stay unset (Diffusers' inpainting starts a full-strength run from pure noise and draws
            nothing for the image).
    """

    reads = ("batch_size",)
    optional_reads = ("height", "width")  # the default image_size
    reusable = True  # deterministic in what it reads (the mode of the latent distribution); not when sampling
    module_params = ("vae",)
    callback_specs = (
        CallbackSpec("image_size", ("image", "req", "settings"),
                     doc="returns the (height, width) the image is resized to (default: the request's height, width)"),
        CallbackSpec("normalize", ("latents", "settings", "vae"),
                     doc="scales the encoded latents (default: (latents - shift_factor) * scaling_factor)"),
        CallbackSpec("pack", ("latents", "req", "settings"),
                     doc="returns the latents in the transformer's input layout (default: unchanged)"),
    )

    def __init__(self, vae, image_field: str = "image", field: str = "image_latents", resized_field: str | None = None,
                 shape_field: str | None = None, frames_axis: bool = False, sample: bool = False,
                 strength_field: str | None = None):
        super().__init__()
        self.vae = vae
        self.image_field, self.field, self.resized_field = image_field, field, resized_field
        self.shape_field = shape_field
        self.frames_axis = frames_axis
        self.sample, self.strength_field = sample, strength_field
        self.reusable = not sample  # a sample depends on the generator's state, which reuse cannot see

    @classmethod
    def contract(cls, args) -> Contract:
        base = super().contract(args)
        outputs = {args.get("field", "image_latents"): "latents of the input image"}
        if args.get("resized_field"):
            outputs[args["resized_field"]] = "the resized input image"
        if args.get("shape_field"):
            outputs[args["shape_field"]] = "shape of the input image's latents before packing"
        reads = {args.get("image_field", "image")} | ({"generator"} if args.get("sample") else set())
        optional_reads = {args["strength_field"]} if args.get("strength_field") else set()
        skipped = bool(args.get("strength_field"))  # at full strength nothing is written
        return Contract(reads=base.reads | reads, writes=frozenset() if skipped else frozenset(outputs),
                        optional_reads=base.optional_reads | optional_reads,
                        optional_writes=frozenset(outputs) if skipped else frozenset(),
                        callbacks=base.callbacks, modules=base.modules,
                        declares={f: doc for f, doc in outputs.items() if f not in Req.field_names()})

    def required_reads(self) -> tuple[str, ...]:
        return tuple(self.reads) + (self.image_field,) + (("generator",) if self.sample else ())

    def guaranteed_writes(self) -> tuple[str, ...]:
        if self.strength_field:
            return ()
        return (self.field,) + tuple(f for f in (self.resized_field, self.shape_field) if f)

    def seed_list_problem(self) -> str | None:
        """Why a request may not give one seed per prompt here (None: it may)."""
        return "ImageEncodingStage samples the image's latents from the generator (sample: true)" \
            if self.sample else None

    @staticmethod
    def default_image_size(image, req, settings):
        return req.height, req.width

    @staticmethod
    def default_normalize(latents, settings, vae):
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @staticmethod
    def default_pack(latents, req, settings):
        return latents

    @torch.no_grad()
    def forward(self, req: Req) -> Req:
        if at_full_strength(req, self.strength_field):
            return req  # a run from pure noise: no image latents (and no draw from the generator)
        image = open_image(getattr(req, self.image_field), self.image_field)
        height, width = self.callback("image_size")(image, req, self.settings)
        resized, pixels = image_pixels(image, height, width)
        if self.frames_axis:
            pixels = pixels.unsqueeze(2)
        # one image for the whole batch, drawn once (as Diffusers encodes it before repeating it)
        latents = encode_pixels(self.vae, pixels, req.generator if self.sample else None)
        latents = self.callback("normalize")(latents, self.settings, self.vae)
        if self.shape_field:
            setattr(req, self.shape_field, tuple(latents.shape))
        latents = self.callback("pack")(latents, req, self.settings)
        setattr(req, self.field, torch.cat([latents] * req.batch_size))  # as Diffusers (keeps the memory layout)
        if self.resized_field:
            setattr(req, self.resized_field, resized)
        return req
