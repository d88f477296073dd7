"""ImageEncodingStage: open the request's input image, resize it and encode it with the VAE (for
editing and image-to-image models, which condition on the latents of an input image)."""
from __future__ import annotations

import torch

from diffstage.images import open_image
from diffstage.req import Req
from diffstage.stage import CallbackSpec, Contract, PipelineStage
from diffstage.torch_utils import module_device, module_dtype

from .decoding import vae_lock


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
    """

    reads = ("batch_size",)
    optional_reads = ("height", "width")  # the default image_size
    reusable = True  # deterministic in what it reads (the mode of the latent distribution, no sampling)
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
                 shape_field: str | None = None, frames_axis: bool = False):
        super().__init__()
        self.vae = vae
        self.image_field, self.field, self.resized_field = image_field, field, resized_field
        self.shape_field = shape_field
        self.frames_axis = frames_axis

    @classmethod
    def contract(cls, args) -> Contract:
        base = super().contract(args)
        outputs = {args.get("field", "image_latents"): "latents of the input image"}
        if args.get("resized_field"):
            outputs[args["resized_field"]] = "the resized input image"
        if args.get("shape_field"):
            outputs[args["shape_field"]] = "shape of the input image's latents before packing"
        return Contract(reads=base.reads | {args.get("image_field", "image")}, writes=frozenset(outputs),
                        optional_reads=base.optional_reads, callbacks=base.callbacks, modules=base.modules,
                        declares={f: doc for f, doc in outputs.items() if f not in Req.field_names()})

    def required_reads(self) -> tuple[str, ...]:
        return tuple(self.reads) + (self.image_field,)

    def guaranteed_writes(self) -> tuple[str, ...]:
        return (self.field,) + tuple(f for f in (self.resized_field, self.shape_field) if f)

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
        from diffusers.image_processor import VaeImageProcessor

        image = open_image(getattr(req, self.image_field), self.image_field)
        height, width = self.callback("image_size")(image, req, self.settings)
        processor = VaeImageProcessor(vae_scale_factor=1)  # the sizes are the callback's to choose
        resized = processor.resize(image, height, width)
        pixels = processor.preprocess(resized, height, width)  # [1, 3, H, W] in [-1, 1]
        if self.frames_axis:
            pixels = pixels.unsqueeze(2)
        pixels = pixels.to(device=module_device(self.vae), dtype=module_dtype(self.vae))
        with vae_lock(self.vae):  # pipelines share the VAE (see decoding.vae_lock)
            latents = self.vae.encode(pixels).latent_dist.mode()  # the mean, as Diffusers' sample_mode="argmax"
        latents = self.callback("normalize")(latents, self.settings, self.vae)
        if self.shape_field:
            setattr(req, self.shape_field, tuple(latents.shape))
        latents = self.callback("pack")(latents, req, self.settings)
        setattr(req, self.field, latents.repeat(req.batch_size, *([1] * (latents.dim() - 1))))
        if self.resized_field:
            setattr(req, self.resized_field, resized)
        return req
