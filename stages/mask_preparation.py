"""MaskPreparationStage: an inpainting model's extra inputs, the mask at the latents' size and the latents of the
input image with the part to repaint blanked out."""
from __future__ import annotations

import torch

from diffstage.images import open_image
from diffstage.req import Req
from diffstage.stage import CallbackSpec, Contract, PipelineStage

from .image_encoding import ImageEncodingStage, encode_pixels, image_pixels


def mask_pixels(mask, height: int, width: int) -> torch.Tensor:
    """The mask [1, 1, H, W] as Diffusers' inpainting mask processor makes it: grey, resized to height x width,
    in [0, 1], binarized at 0.5 (1: repaint)."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    return processor.preprocess(mask, height, width)


class MaskPreparationStage(PipelineStage):
    """Prepares the mask inputs of an inpainting model from the request's mask (white: repaint, black: keep)
    and input image, both resized to the output size, as Diffusers' inpainting pipelines do:

    - `field`: the binarized mask at the latents' size ([B, 1, h, w], nearest neighbour, h and w from
      raw_latent_shape), one copy per batch item;
    - `masked_image_field`: the VAE latents of the image with the pixels to repaint set to 0
      (image * (mask < 0.5)), normalized like ImageEncodingStage's, one copy per batch item.

    A callback (`denoising.latent_input`) then joins them to the latents, e.g. on the channels for a
    9-channel UNet. Runs after LatentPreparationStage: with `sample` the masked image's latents are drawn
    from the request's generator after the noise, as in Diffusers.

    Args:
        mask_field / image_field: the request fields with the mask and the image (declare them in
            `request_fields`; defaults `mask_image`, `image`).
        field / masked_image_field: where the outputs go (defaults `mask`, `masked_image_latents`).
        sample: draw the masked image's latents from the VAE's latent distribution with the request's
            generator (Diffusers' inpainting does), instead of taking its mean.
    """

    reads = ("batch_size", "height", "width", "raw_latent_shape")
    module_params = ("vae",)
    callback_specs = (
        CallbackSpec("normalize", ("latents", "settings", "vae"),
                     doc="scales the masked image's latents (default: (latents - shift_factor) * scaling_factor)"),
    )

    def __init__(self, vae, mask_field: str = "mask_image", image_field: str = "image", field: str = "mask",
                 masked_image_field: str = "masked_image_latents", sample: bool = False):
        super().__init__()
        self.vae = vae
        self.mask_field, self.image_field = mask_field, image_field
        self.field, self.masked_image_field = field, masked_image_field
        self.sample = sample

    @classmethod
    def contract(cls, args) -> Contract:
        base = super().contract(args)
        inputs = {args.get("mask_field", "mask_image"), args.get("image_field", "image")}
        outputs = {args.get("field", "mask"): "the inpainting mask at the latents' size (1: repaint)",
                   args.get("masked_image_field", "masked_image_latents"):
                       "latents of the input image with the part to repaint blanked out"}
        if len(outputs) < 2:
            raise ValueError("field and masked_image_field must differ")
        return Contract(reads=base.reads | inputs | ({"generator"} if args.get("sample") else set()),
                        writes=frozenset(outputs), callbacks=base.callbacks, modules=base.modules,
                        declares={f: doc for f, doc in outputs.items() if f not in Req.field_names()})

    def required_reads(self) -> tuple[str, ...]:
        return tuple(self.reads) + (self.mask_field, self.image_field) + (("generator",) if self.sample else ())

    def guaranteed_writes(self) -> tuple[str, ...]:
        return self.field, self.masked_image_field

    default_normalize = staticmethod(ImageEncodingStage.default_normalize)

    def request_problems(self, req: Req) -> list[str]:
        needed = ((self.image_field, "the image to inpaint"),
                  (self.mask_field, "the mask (white: repaint, black: keep)"))
        return [f"{name} is required: {what}" for name, what in needed if getattr(req, name) is None]

    def seed_list_problem(self) -> str | None:
        """Why a request may not give one seed per prompt here (None: it may)."""
        return "MaskPreparationStage samples the masked image's latents from the generator (sample: true)" \
            if self.sample else None

    @torch.no_grad()
    def forward(self, req: Req) -> Req:
        height, width = req.height, req.width
        _, pixels = image_pixels(open_image(getattr(req, self.image_field), self.image_field), height, width)
        mask = mask_pixels(open_image(getattr(req, self.mask_field), self.mask_field), height, width)
        masked = pixels * (mask < 0.5)
        latents = encode_pixels(self.vae, masked, req.generator if self.sample else None)
        latents = self.callback("normalize")(latents, self.settings, self.vae)
        small = torch.nn.functional.interpolate(mask, size=tuple(req.raw_latent_shape[-2:]))
        batch = req.batch_size
        setattr(req, self.field, small.to(device=latents.device, dtype=latents.dtype).repeat(batch, 1, 1, 1))
        setattr(req, self.masked_image_field, latents.repeat(batch, *([1] * (latents.dim() - 1))))
        return req
