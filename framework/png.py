"""Write PNGs with provenance in PNG text chunks, atomically, never over an existing file."""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .output_files import write_new


def save_png(image: Image.Image, path: str | Path, text: dict[str, str]) -> Path:
    """Save `image` with text chunks to `path`, or to the first free `stem-N.png` beside it when
    that name is taken (another run, a folder of that name). Returns the path written."""
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))
    return write_new(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
