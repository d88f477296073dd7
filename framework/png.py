"""Write PNGs atomically, with provenance in PNG text chunks, never over an existing file."""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import OutputError

MAX_TRIES = 10_000


def free_names(path: Path) -> Iterator[Path]:
    """`path`, then `stem-1.png`, `stem-2.png`, ... beside it."""
    yield path
    for n in range(1, MAX_TRIES):
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")


def _claim(tmp: str, target: Path) -> bool:
    """Give the finished temporary file the name `target` if nobody has it; True if done."""
    try:
        os.link(tmp, target)  # atomic and exclusive: fails if the name exists, even as a folder
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
    # A filesystem without hard links: reserve the name exclusively, then move the file onto it.
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    os.replace(tmp, target)
    return True


def save_png(image: Image.Image, path: str | Path, text: dict[str, str]) -> Path:
    """Save `image` with text chunks to `path`, or to the first free `stem-N.png` beside it when
    that name is taken (another run, a folder of that name). Returns the path written. A crash
    never leaves half a file, and no existing file is ever replaced."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, str(value))
        fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write into '{path.parent}': {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        for candidate in free_names(path):
            if _claim(tmp, candidate):
                return candidate
        raise OutputError(f"'{path}' and {MAX_TRIES - 1} numbered names beside it are all taken")
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
