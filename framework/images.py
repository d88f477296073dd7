"""Input images of a request: what counts as one, and opening it as RGB (for the stages and callbacks
that take an image: VAE encoding, vision-language text encoders, an output size that follows it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import RequestError


def is_image(value: Any) -> bool:
    """A file path, a PIL image or a [C, H, W] tensor: what `open_image` opens."""
    return isinstance(value, (str, os.PathLike, Image.Image)) or (isinstance(value, torch.Tensor) and value.dim() == 3)


def open_image(value, name: str = "image") -> Image.Image:
    """A request's image as RGB PIL: a PIL image as given, a path opened (errors name the field and file)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (str, Path)):
        try:
            with Image.open(value) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as e:
            raise RequestError(f"{name}: cannot open '{value}' as an image: {e}") from None
    if isinstance(value, torch.Tensor) and value.dim() == 3:  # [C, H, W] in [0, 1]
        array = (value.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array).convert("RGB")
    raise RequestError(f"{name} must be a PIL image, a [C, H, W] tensor in [0, 1] or a file path, "
                       f"got {type(value).__name__}")
