"""Write PNGs atomically, with provenance in PNG text chunks."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png(image: Image.Image, path: str | Path, text: dict[str, str]) -> Path:
    """Save `image` to `path` with text chunks; a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
