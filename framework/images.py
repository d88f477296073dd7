"""Input images of a request: what counts as one, and opening it as RGB (for the stages and callbacks
that take an image: VAE encoding, vision-language text encoders, an output size that follows it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .errors import RequestError


def is_image(value: Any) -> bool:
    """A file path, a PIL image or a [C, H, W] tensor: what `open_image` opens."""
    return isinstance(value, (str, os.PathLike, Image.Image)) or (isinstance(value, torch.Tensor) and value.dim() == 3)


# The raster formats a file path may hold (Pillow's names, as shown in errors). Pillow is never asked to try
# another: EPS and PS make it run Ghostscript, and other plugins are code no request needs.
FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF", "GIF": "GIF"}


def open_image(value, name: str = "image") -> Image.Image:
    """A request's image as RGB PIL: a PIL image as given, a path opened (errors name the field and file);
    a GIF or TIFF gives its first frame."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (str, Path)):
        try:
            with Image.open(value, formats=list(FORMATS)) as image:
                return image.convert("RGB")
        except UnidentifiedImageError:
            raise RequestError(f"{name}: cannot open '{value}' as an image: it is not in one of the formats diffstage "
                               f"reads ({', '.join(FORMATS.values())}); convert it to PNG") from None
        except (OSError, ValueError) as e:
            raise RequestError(f"{name}: cannot open '{value}' as an image: {e}") from None
    if isinstance(value, torch.Tensor) and value.dim() == 3:  # [C, H, W] in [0, 1]
        array = (value.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array).convert("RGB")
    raise RequestError(f"{name} must be a PIL image, a [C, H, W] tensor in [0, 1] or a file path, "
                       f"got {type(value).__name__}")
