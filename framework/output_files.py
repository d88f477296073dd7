"""Write output files atomically and never over an existing file (another run's image, a folder)."""
from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError

MAX_TRIES = 10_000


def free_names(path: Path) -> Iterator[Path]:
    """`path`, then `stem-1.ext`, `stem-2.ext`, ... beside it."""
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


def taken(path: Path) -> str:
    return f"'{path}' exists; diffstage never overwrites a file: remove it or choose another path"


def write_new(path: str | Path, write: Callable[[str], None], numbered: bool = True) -> Path:
    """Run `write(tmp_path)` to make the file, then give it the name `path`, or the first free
    `stem-N.ext` beside it when that is taken (`numbered=False`: refuse a taken name instead).
    Returns the path written. A crash never leaves half a file, and no existing file is ever replaced."""
    path = Path(path)
    if not numbered and os.path.lexists(path):  # before the work of making it
        raise OutputError(taken(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a run directory, or `--output my_models/x.json`
        fd, tmp = tempfile.mkstemp(suffix=path.suffix + ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write into '{path.parent}': {e.strerror or e}") from None
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        for candidate in free_names(path) if numbered else [path]:
            if _claim(tmp, candidate):
                return candidate
        if not numbered:  # it appeared while we wrote
            raise OutputError(taken(path))
        raise OutputError(f"'{path}' and {MAX_TRIES - 1} numbered names beside it are all taken")
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
