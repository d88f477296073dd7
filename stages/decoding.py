"""DecodingStage: undo packing and latent normalisation, run the VAE, convert the output."""
from __future__ import annotations

import threading
import weakref
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

from diffstage.distributed import current
from diffstage.errors import StageError
from diffstage.memory import config_value
from diffstage.patch_decode import decode_across_ranks
from diffstage.req import Req
from diffstage.stage import CallbackSpec, PipelineStage
from diffstage.torch_utils import module_device, module_dtype
from diffstage.vae_decode import DecodeOptions, tiling_args, vae_tiling


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[B, H, W, C] floats in [0, 1] -> PIL images (rounded as Diffusers does)."""
    arr = (images * 255).round().astype("uint8")
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]


def check_finite_decoded(image, stage: str, also: str = "") -> None:
    """Refuse decoded pixels (a tensor or array) with NaN or Inf: clamping or 8-bit conversion would turn them
    into a black image, silently."""
    if not bool(torch.isfinite(torch.as_tensor(image)).all()):
        raise StageError(f"{stage}: the VAE decoded NaN or infinite values; check the VAE's config.json "
                         f"(scaling_factor, shift_factor){' ' + also if also else ''}")


_DECODE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE -> its lock
_LOCKS_GUARD = threading.Lock()


def vae_lock(vae) -> threading.Lock:
    """One decode or encode at a time per VAE: pipelines share a loaded VAE (the session's module cache), and a
    video VAE keeps its state on the module while it runs (its causal convolutions' cache), so two at once would
    mix their frames."""
    with _LOCKS_GUARD:
        lock = _DECODE_LOCKS.get(vae)
        if lock is None:
            lock = _DECODE_LOCKS[vae] = threading.Lock()
    return lock


class DecodingStage(PipelineStage):
    reads = ("latents",)
    optional_reads = ("raw_latent_shape", "height", "width")
    writes = ("output",)
    optional_writes = ("decoded",)  # not set for output_type="latent"
    module_params = ("vae",)
    callback_specs = (
        CallbackSpec("unpack", ("latents", "req", "settings", "vae"),
                     doc="returns latents in the VAE's [B, C, H, W] (video: [B, C, F, H, W]) layout "
                         "(default: unchanged)"),
        CallbackSpec("denormalize", ("latents", "settings", "vae"),
                     doc="undoes the latent scaling (default: latents / scaling_factor + shift_factor)"),
        CallbackSpec("postprocess_image", ("image", "settings"),
                     doc="adjusts what the VAE decoded, e.g. takes the one frame a video VAE gives an image "
                         "model (default: unchanged)"),
    )

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.decode_options = DecodeOptions()  # the run config's runtime.vae_* (set_decode_options)

    def set_decode_options(self, options: DecodeOptions) -> None:
        """Decode with the VAE's tiling and/or one band per rank; a VAE without tiling is refused now, before
        any step runs."""
        if options.tiling:
            tiling_args(self.vae, options.tile_size)
        self.decode_options = options

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's pixels for `latents`, as the decode options ask; one decode at a time per VAE."""
        vae, options = self.vae, self.decode_options

        def whole(z: torch.Tensor) -> torch.Tensor:
            return vae.decode(z, return_dict=False)[0]

        with vae_lock(vae), vae_tiling(vae, options.tile_size) if options.tiling else nullcontext():
            return decode_across_ranks(whole, latents, options.halo) if options.parallel else whole(latents)

    def decoded_at_once(self, h: int, w: int, ratio: int) -> tuple[int, int]:
        """The pixels one VAE call works on: a rank's band with its halo (runtime.vae_parallel), at most a tile
        (runtime.vae_tiling), else the whole frame; `ratio`: pixels per latent pixel, where the VAE does not say."""
        options, world = self.decode_options, current().world_size
        ratio = int(getattr(self.vae, "spatial_compression_ratio", None) or ratio)
        if options.parallel and world > 1:
            h = min(h, (-(-h // ratio // world) + 2 * options.halo) * ratio)
        tile = options.tile_size or getattr(self.vae, "tile_sample_min_height", None)
        if options.tiling and isinstance(tile, int):
            h, w = min(h, tile), min(w, tile)
        return h, w

    @staticmethod
    def default_unpack(latents, req, settings, vae):
        return latents

    @staticmethod
    def default_postprocess_image(image, settings):
        return image

    @staticmethod
    def default_denormalize(latents, settings, vae):
        cfg = vae.config
        latents = latents / cfg.scaling_factor
        shift = getattr(cfg, "shift_factor", None)
        return latents + shift if shift is not None else latents

    def memory_estimate(self, req: Req) -> dict[str, int]:
        if req.output_type == "latent":
            return {}
        # a video model's frames come from its `num_frames` request field (the usual name, as in Diffusers)
        frames = getattr(req, "num_frames", None)
        b = req.batch_size if req.batch_size is not None else req.requested_batch_size()
        b *= frames if isinstance(frames, int) and frames > 0 else 1
        itemsize = module_dtype(self.vae).itemsize
        channels = list(config_value(self.vae, "block_out_channels") or [128])
        h, w = self.decoded_at_once(req.height, req.width, 2 ** (len(channels) - 1))
        # The decoder's widest activation: level i runs at 1/4**i of the pixels, with block_out_channels[i]
        # channels and the upsampled output of level i+1 as its input; a resnet block holds its input,
        # its output, a normalised copy and the residual (measured: 4x is within 10% of the peak RSS).
        widest = max(max(channels[i:i + 2]) * h * w // 4 ** i for i in range(len(channels)))
        frame = 3 * req.height * req.width  # the decoded frames: a tensor, a float32 array, 8-bit images
        return {"VAE decode": 4 * b * widest * itemsize, "decoded images": b * frame * (itemsize + 4 + 1)}

    @torch.no_grad()
    def forward(self, req: Req) -> Req:
        if req.output_type == "latent":
            req.output = req.latents
            return req
        latents = self.callback("unpack")(req.latents, req, self.settings, self.vae)
        latents = self.callback("denormalize")(latents, self.settings, self.vae)
        latents = latents.to(device=module_device(self.vae), dtype=module_dtype(self.vae))
        decoded = self.decode(latents)
        image = self.callback("postprocess_image")(decoded, self.settings)
        check_finite_decoded(image, "DecodingStage", "and the model YAML's decoding callbacks")
        image = (image * 0.5 + 0.5).clamp(0, 1)
        req.decoded = image
        req.output = self.convert(image, req.output_type)
        return req

    @staticmethod
    def convert(image: torch.Tensor, output_type: str):
        """Decoded [B, C, H, W] images or [B, C, F, H, W] videos in [0, 1] to `output_type`, as Diffusers
        returns them: images [B, H, W, C] / [B, C, H, W] / PIL; videos [B, F, H, W, C] / [B, F, C, H, W] /
        one list of PIL frames per video."""
        video = image.dim() == 5
        if output_type == "pt":
            return image.permute(0, 2, 1, 3, 4) if video else image
        arr = image.cpu().permute(0, 2, 3, 4, 1).float().numpy() if video else \
            image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return arr
        return [to_pil(frames) for frames in arr] if video else to_pil(arr)
